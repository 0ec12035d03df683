"""`data.reset_*` and finetune `packing: true` through `llmforge run`: the stages wire the step, the loader and the log."""

from __future__ import annotations

import math
import re

import pytest
import yaml

from llmforge.testing import TINY_SPEC
from tests.e2e.conftest import llmforge, rows

pytestmark = pytest.mark.slow

SFT = {"name": "sft", "type": "sft", "init_from": "pretrain", "packing": True, "max_seq_length": 32,
       "data": {"sources": {"add": {"name": "tasks", "tasks": ["add2"], "num_examples": 200}}, "val_fraction": 0.1},
       "train": {"micro_batch_size": 4, "global_batch_size": 8, "max_steps": 3, "optimizer": {"name": "adamw", "lr": 1.0e-3},
                 "eval_interval": 3, "eval_iters": 1}}
LONGEST_EXAMPLE = 13  # "<|bos|><|user|>99+99=<|assistant|>198<|eos|>" in bytes and special tokens


def test_packed_pretraining_and_packed_sft_run(tmp_path):
    spec = yaml.safe_load(TINY_SPEC.read_text())
    spec["data"].update(reset_position_ids=True, reset_attention_mask=True, eod_mask_loss=True)
    spec["model"]["position_embedding_type"] = "rope"
    spec["stages"].append(SFT)
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    proc = llmforge("run", str(tmp_path / "spec.yaml"), "--run-dir", str(tmp_path / "run"), env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = (tmp_path / "run" / "run.log").read_text()
    assert "[pretrain] packed windows split at EOD" in log and "reset_position_ids, reset_attention_mask, eod_mask_loss" in log
    packed = re.search(r"\[sft\] (\d+) train / \d+ val examples, packed into (\d+) rows of 32 tokens", log)
    assert packed and int(packed[2]) < int(packed[1]), log[-2000:]
    sft = [r for r in rows(tmp_path / "run", "train") if r["stage"] == "sft"]
    # Real input tokens per step: more than one example per row reaches the model.
    assert sft[0]["tokens"] > SFT["train"]["global_batch_size"] * LONGEST_EXAMPLE
    evals = [r for r in rows(tmp_path / "run", "eval") if r["stage"] in ("pretrain", "sft")]
    assert all(math.isfinite(r["val_loss"]) for r in evals) and {r["stage"] for r in evals} == {"pretrain", "sft"}
