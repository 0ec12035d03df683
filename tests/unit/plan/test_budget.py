"""Tokens, steps and epochs per stage: from the manifest when shards exist, else from the spec."""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import pytest

from llmforge.plan.budget import stage_budgets
from llmforge.spec.validate import load_and_validate

SPEC = """\
name: budget
tokenizer: {name: byte}
data:
  sources:
    corpus: {name: text, paths: ["%(corpus)s"]}
  split: {val_fraction: 0.1}
model: {name: gpt, num_layers: 2, hidden_size: 64, num_attention_heads: 4, vocab_size: 512, seq_length: 32}
stages:
  - {name: prepare, type: prepare}
  - name: pretrain
    type: pretrain
    train: {micro_batch_size: 2, global_batch_size: 8, %(budget)s}
  - name: sft
    type: sft
    init_from: pretrain
    data: {sources: {chat: {name: instructions, paths: ["%(sft)s"]}}, val_fraction: 0.0}
    evaluators: []
    train: {micro_batch_size: 1, global_batch_size: 4, max_epochs: 2}
"""


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("x" * 100_000)
    sft = tmp_path / "chat.jsonl"
    sft.write_text("".join(json.dumps({"prompt": f"q{i}", "response": f"a{i}"}) + "\n" for i in range(10)))
    return {"corpus": corpus, "sft": sft, "run_dir": tmp_path / "run"}


def budgets(files: dict[str, Path], budget: str) -> dict:
    path = files["corpus"].parent / "spec.yaml"
    path.write_text(textwrap.dedent(SPEC % {"corpus": files["corpus"], "sft": files["sft"], "budget": budget}))
    spec, _ = load_and_validate(str(path), check_inputs=False)  # as `plan` does: the data may live elsewhere
    return {b.name: b for b in stage_budgets(spec, files["run_dir"])}


def write_manifest(run_dir: Path, samples: int, tokens: int) -> None:
    (run_dir / "data").mkdir(parents=True)
    manifest = {"version": 1, "seq_length": 32, "splits": {"train": {"samples": samples, "tokens": tokens, "shards": []},
                                                           "val": {"samples": 3, "tokens": 99, "shards": []}}}
    (run_dir / "data" / "manifest.json").write_text(json.dumps(manifest))


def test_max_steps_gives_steps_times_tokens_per_step(files):
    b = budgets(files, "max_steps: 100")["pretrain"]
    assert (b.steps, b.tokens_per_step, b.tokens, b.source) == (100, 8 * 32, 100 * 8 * 32, "spec")


def test_max_tokens_rounds_up_to_whole_steps_like_the_training_loop(files):
    b = budgets(files, "max_tokens: 1000")["pretrain"]
    assert b.steps == math.ceil(1000 / 256) == 4
    assert b.tokens == 1024


def test_manifest_gives_exact_epochs(files):
    write_manifest(files["run_dir"], samples=400, tokens=400 * 33)
    b = budgets(files, "max_epochs: 1.5")
    assert b["pretrain"].source == "manifest"
    assert b["pretrain"].steps == math.ceil(1.5 * 400 / 8) == 75
    assert b["pretrain"].epochs == pytest.approx(1.5)
    assert b["prepare"].dataset_tokens == 400 * 33 and b["prepare"].source == "manifest"


def test_without_a_manifest_epochs_are_estimated_from_the_input_files(files):
    b = budgets(files, "max_epochs: 1")
    # byte tokenizer: one token per byte; 10% held out for validation; windows of seq_length + 1
    samples = round(100_000 * 0.9) // 33
    assert b["pretrain"].source == "estimate"
    assert b["pretrain"].samples_per_epoch == samples
    assert b["pretrain"].steps == math.ceil(samples / 8)
    assert "estimated" in b["pretrain"].note


def test_finetune_epochs_count_the_examples(files):
    b = budgets(files, "max_steps: 10")["sft"]
    assert b.samples_per_epoch == 10
    assert b.steps == math.ceil(2 * 10 / 4) == 5
    assert b.epochs == pytest.approx(2.0)


def test_unknown_when_the_data_is_elsewhere(files):
    files["sft"].unlink()
    b = budgets(files, "max_steps: 10")["sft"]
    assert b.source == "unknown" and b.steps is None and b.tokens is None
    assert "not here" in b.note
