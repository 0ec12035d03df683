"""A spec of finetune stages only (a published model's) needs no `prepare`: the run's first stage copies a
`pretrained` tokenizer into the run dir; llmforge's own tokenizers still need a prepare stage to build them."""

from __future__ import annotations

import pytest
import yaml

from llmforge.data.tokenizers import load_tokenizer
from llmforge.registry.manager import get_registry
from llmforge.runtime.context import RunContext
from llmforge.runtime.metrics import Log
from llmforge.runtime.rundir import RunDir
from llmforge.spec.errors import UserError
from llmforge.spec.validate import load_and_validate
from tests.unit.data.chat_fixtures import tokenizer_folder

MODEL = {"name": "gpt", "num_layers": 1, "hidden_size": 32, "num_attention_heads": 2, "ffn_hidden_size": 64, "vocab_size": 512,
         "seq_length": 64}


def _context(tmp_path, tokenizer: dict) -> RunContext:
    spec_path = tmp_path / "spec.yaml"
    stage = {"name": "sft", "type": "sft", "data": {"sources": {"c": {"name": "instructions", "paths": ["c.jsonl"]}}},
             "train": {"micro_batch_size": 1, "global_batch_size": 1, "max_steps": 1}}
    spec_path.write_text(yaml.safe_dump({"name": "t", "tokenizer": tokenizer, "model": MODEL, "stages": [stage]}))
    spec, _ = load_and_validate(str(spec_path), check_inputs=False)
    return RunContext(spec=spec, registry=get_registry(), run=RunDir(tmp_path / "run"), log=Log(None, enabled=False), resuming=False,
                      plan={})


def test_a_pretrained_tokenizer_is_copied_into_the_run_without_prepare(tmp_path):
    folder = tokenizer_folder(tmp_path, "qwen3")
    tokenizer = _context(tmp_path, {"name": "pretrained", "path": str(folder)}).tokenizer()
    copied = tmp_path / "run" / "tokenizer"
    assert (copied / "chat_template.jinja").read_text() == (folder / "chat_template.jinja").read_text()
    assert load_tokenizer(copied).encode("What is the capital of France?") == tokenizer.encode("What is the capital of France?")


def test_a_tokenizer_llmforge_builds_still_needs_prepare(tmp_path):
    with pytest.raises(UserError, match="no tokenizer in"):
        _context(tmp_path, {"name": "byte"}).tokenizer()
