"""Small synthetic corpora and specs for the data tests (each prepare takes well under a second)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import yaml

from llmforge.data.prepare import run_prepare
from llmforge.spec.validate import load_and_validate

WORDS = "the quick brown fox jumps over a lazy dog while 12 cats and 345 owls watch from the old oak tree".split()


def write_corpus(root: Path, n_docs: int = 30, seed: int = 0, words: tuple[int, int] = (40, 200)) -> Path:
    """`n_docs` text files of random words, half of them one folder down."""
    rng = random.Random(seed)
    for i in range(n_docs):
        folder = root / ("sub" if i % 2 else "")
        folder.mkdir(parents=True, exist_ok=True)
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(*words)))
        (folder / f"doc{i:03d}.txt").write_text(f"document {i}: {text}\n")
    return root


def make_spec(tmp_path: Path, *, sources: dict | None = None, tokenizer: dict | None = None, data: dict | None = None,
              seq_length: int = 16, vocab_size: int = 512, packing: str = "windows", seed: int = 1234, overrides: list[str] = ()):
    """A validated Spec with the given data sections (defaults: the byte tokenizer on tmp_path/corpus)."""
    doc = {
        "name": "datatest",
        "seed": seed,
        "tokenizer": tokenizer or {"name": "byte"},
        "data": {
            "sources": sources or {"corpus": {"name": "text", "paths": [str(tmp_path / "corpus" / "**" / "*.txt")]}},
            "split": {"by": "document", "val_fraction": 0.1},
            "shard_size_mb": 0.01,
            "num_workers": 1,
            **(data or {}),
        },
        "model": {"name": "gpt", "num_layers": 2, "hidden_size": 64, "num_attention_heads": 2, "vocab_size": vocab_size, "seq_length": seq_length},
        "stages": [{"name": "prepare", "type": "prepare", "packing": packing}],
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(doc))
    spec, _ = load_and_validate(str(path), list(overrides))
    return spec


def prepare(spec, run_dir: Path, logs: list[str] | None = None) -> dict:
    return run_prepare(spec, run_dir, spec.stages[0], log=(logs.append if logs is not None else lambda m: None))


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    return write_corpus(tmp_path / "corpus")


@pytest.fixture
def prepared(tmp_path: Path, corpus: Path) -> tuple[object, Path, dict]:
    """(spec, data_dir, manifest) of the default corpus, byte tokenizer, seq_length 16."""
    spec = make_spec(tmp_path)
    manifest = prepare(spec, tmp_path / "run")
    return spec, tmp_path / "run" / "data", manifest
