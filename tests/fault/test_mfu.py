"""MFU at two processes: model FLOPs per second per device over one device's peak, in metrics.jsonl and the log."""

from __future__ import annotations

import re

import pytest

from llmforge.models.size import flops_per_token
from llmforge.spec.validate import load_and_validate
from tests.fault.harness import rows

pytestmark = pytest.mark.slow

PEAK = 2.0e9  # LLMFORGE_PEAK_FLOPS: one device's peak, the same on both ranks


def test_mfu_at_dp2_is_per_device(llmforge, spec, fault_dir):
    run_dir = fault_dir / "mfu-dp2"
    env = {"LLMFORGE_PEAK_FLOPS": f"{PEAK:g}"}
    job = llmforge.ranks("--run-dir", str(run_dir), "stages.1.train.max_steps=4", env={0: env, 1: env})
    assert job.wait(600) == [0, 0], job.result(0).output[-4000:] + job.result(1).output[-2000:]
    model = load_and_validate(str(spec))[0].model
    per_token = flops_per_token(model, model.seq_length)
    train = rows(run_dir)
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    for row in train:
        # Two devices share the job's tokens/s: each one's model FLOP/s is half of it.
        assert row["mfu"] * PEAK / per_token == pytest.approx(row["tokens_per_s"] / 2, rel=1e-9)
    logged = re.findall(r"\[pretrain\] step (\d)/4 .* mfu ([\d.]+)%", (run_dir / "run.log").read_text())
    assert [(int(step), float(mfu)) for step, mfu in logged] == [(r["step"], round(100 * r["mfu"], 1)) for r in train]
