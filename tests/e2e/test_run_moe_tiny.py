"""`llmforge run specs/moe-tiny.yaml`, shrunk: a CPU mixture of experts learns, and says how its routers balance."""

from __future__ import annotations

import pytest

from tests.e2e.conftest import llmforge, rows

pytestmark = pytest.mark.slow

# Two stdlib packages, a 512-token vocabulary and 40 steps: the spec's model and experts as they are.
MOE_SMALL = [
    'data.sources.stdlib.paths=["${stdlib:}/json/*.py","${stdlib:}/email/*.py"]',
    "data.sources.stdlib.exclude=[]",
    "data.split.val_fraction=0.1",
    "tokenizer.vocab_size=512",
    "model.vocab_size=512",
    "stages.1.train.max_steps=40",
    "stages.1.train.lr_schedule.warmup_steps=4",
    "stages.1.train.eval_interval=40",
    "stages.1.train.eval_iters=2",
    "logging.log_interval=5",
    "logging.sample_tokens=0",
]


def test_moe_tiny_learns_and_logs_its_routers(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    proc = llmforge("run", "specs/moe-tiny.yaml", *MOE_SMALL, "--run-dir", str(run_dir))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    train = rows(run_dir, "train")
    assert [r["step"] for r in train] == list(range(5, 41, 5))
    assert train[-1]["loss"] < train[0]["loss"] - 0.5  # it learns
    for row in train:
        # The load-balancing loss is 1 for a perfectly balanced router (Switch's E · Σ f·P).
        assert 0.9 < row["moe/aux_loss"] < 2.0 and row["moe/z_loss"] > 0
        for layer in range(4):
            shares = [row[f"moe/layer{layer}/expert{e}_load"] for e in range(8)]
            assert sum(shares) == pytest.approx(1.0)
            assert row[f"moe/layer{layer}/load_max_min"] == pytest.approx(max(shares) / min(shares))
        assert row["moe/load_max_min"] == max(row[f"moe/layer{layer}/load_max_min"] for layer in range(4))
    assert "aux_loss" in proc.stdout and "load_max_min" in proc.stdout
    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    scalars = acc.Tags()["scalars"]
    for tag in ("pretrain/moe/aux_loss", "pretrain/moe/z_loss", "pretrain/moe/load_max_min", "pretrain/moe/layer3/expert7_load"):
        assert tag in scalars, (tag, scalars)
