"""Stage handoff (promise 4): a kill during SFT, after pretrain finished, resumes SFT without rerunning pretrain."""

from __future__ import annotations

import json

import pytest

from tests.fault.harness import assert_same_weights, losses, rows, steps_saved

pytestmark = pytest.mark.slow


def test_a_kill_during_sft_resumes_sft_and_leaves_pretrain_alone(llmforge, sft_spec, fault_dir):
    reference = fault_dir / "sft-reference"
    done = llmforge("--run-dir", str(reference), spec=sft_spec)
    assert done.returncode == 0, done.output[-4000:]

    run = fault_dir / "sft-killed"
    # The step counter of a process runs across its stages: pretrain's 6 steps, then SFT's 7th.
    killed = llmforge("--run-dir", str(run), spec=sft_spec, env={"LLMFORGE_FAULT": "train_step@13"})
    assert killed.returncode == -9, killed.output[-4000:]
    state = json.loads((run / "state.json").read_text())["stages"]
    assert state["pretrain"]["status"] == "done" and state["sft"]["status"] == "running"
    assert steps_saved(run, "sft") == [4]
    pretrain_ckpt = run / "checkpoints/pretrain/step-6"
    before = {p: p.stat().st_mtime_ns for p in pretrain_ckpt.rglob("*")}
    pretrain_rows = rows(run, stage="pretrain")

    resumed = llmforge("--run-dir", str(run), "--resume", spec=sft_spec)
    assert resumed.returncode == 0, resumed.output[-4000:]
    assert "[prepare] already done; skipped" in resumed.stdout and "[pretrain] already done; skipped" in resumed.stdout
    assert "[pretrain] step" not in resumed.stdout  # not one pretrain step again
    assert "resumed from" in resumed.stdout and "sft/step-4 at step 4" in resumed.stdout
    assert {p: p.stat().st_mtime_ns for p in pretrain_ckpt.rglob("*")} == before
    assert rows(run, stage="pretrain") == pretrain_rows

    assert losses(run, "pretrain") == losses(reference, "pretrain")
    assert losses(run, "sft") == losses(reference, "sft") and len(losses(run, "sft")) == 12  # bitwise
    assert_same_weights(run / "checkpoints/sft/step-12", reference / "checkpoints/sft/step-12")
    assert json.loads((run / "state.json").read_text())["stages"]["sft"]["status"] == "done"
