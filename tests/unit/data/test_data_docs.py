"""docs/data.md: every spec snippet is accepted by the sources' options models, and each `data:` snippet by validate."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from llmforge.registry.manager import get_registry
from llmforge.spec.validate import load_and_validate

DOC = Path(__file__).resolve().parents[3] / "docs" / "data.md"
BASE = {"name": "docs", "tokenizer": {"name": "byte"},
        "model": {"name": "gpt", "num_layers": 2, "hidden_size": 64, "num_attention_heads": 2, "vocab_size": 512, "seq_length": 16},
        "stages": [{"name": "prepare", "type": "prepare"}]}


def snippets() -> list[dict]:
    return [yaml.safe_load(body) for body in re.findall(r"^```yaml\n(.*?)^```", DOC.read_text(), flags=re.M | re.S)]


def test_every_snippet_is_valid(tmp_path):
    registry = get_registry()
    found = set()
    for doc in snippets():
        sources = [*doc.get("data", {}).get("sources", {}).values()]
        sources += [s for stage in doc.get("stages", []) for s in stage["data"]["sources"].values()]
        assert sources, doc
        for options in sources:
            found.add(options["name"])
            registry.get("source", options["name"]).typed_options.model_validate(options)
        if set(doc) == {"data"}:
            path = tmp_path / "spec.yaml"
            path.write_text(yaml.safe_dump({**BASE, **doc}))
            load_and_validate(str(path), check_inputs=False)
    assert found >= {"text", "jsonl", "parquet", "hf_dataset", "webdataset"}
