"""Train a finished stage longer (issue 33): `--resume --allow-spec-change` with a larger budget continues it."""

from __future__ import annotations

import json
import math

import pytest

from tests.fault.harness import assert_same_weights, copy_run, losses, rows, steps_saved

pytestmark = pytest.mark.slow

# A constant lr is the same at every total: extending 6 steps to 10 must then be training 10 at once.
CONSTANT = "stages.1.train.lr_schedule={name: constant, warmup_steps: 2}"


def test_extending_by_tokens_equals_training_that_long_and_reruns_the_stage_that_reads_it(llmforge, sft_spec, tmp_path):
    ten = tmp_path / "ten"
    done = llmforge("--run-dir", str(ten), CONSTANT, "stages.1.train.max_steps=10", spec=sft_spec)
    assert done.returncode == 0, done.output[-4000:]
    run = tmp_path / "six"
    done = llmforge("--run-dir", str(run), CONSTANT, spec=sft_spec)  # pretrain's 6 steps, then SFT from them
    assert done.returncode == 0, done.output[-4000:]
    sft_from_six = losses(run, "sft")

    # 2560 tokens = 10 steps of 8 × 32.
    extended = llmforge("--run-dir", str(run), CONSTANT, "stages.1.train.max_steps=null", "stages.1.train.max_tokens=2560",
                        "--resume", "--allow-spec-change", spec=sft_spec)
    assert extended.returncode == 0, extended.output[-4000:]
    out = extended.stdout
    assert "[prepare] already done; skipped" in out and "[pretrain] already done" not in out
    assert "[pretrain] budget changed (max_steps 6 -> max_tokens 2560): it trains on from its final checkpoint" in out
    assert f"[pretrain] resumed from {run}/checkpoints/pretrain/step-6 at step 6" in out
    assert "[pretrain] 6 -> 10 steps: lr of step 7, the next: 1.00e-03 before, 1.00e-03 now (constant over 10 steps: unchanged)" in out
    assert "[sft] stale: pretrain's final checkpoint moved from step 6 to step 10; it reruns" in out
    assert f"[sft] initialized from {run}/checkpoints/pretrain/step-10" in out

    assert losses(run, "pretrain") == losses(ten, "pretrain") and len(losses(run, "pretrain")) == 10  # bitwise
    assert_same_weights(run / "checkpoints/pretrain/step-10", ten / "checkpoints/pretrain/step-10")
    assert losses(run, "sft") == losses(ten, "sft") != sft_from_six  # SFT reran, from the longer pretraining
    assert_same_weights(run / "checkpoints/sft/step-12", ten / "checkpoints/sft/step-12")
    state = json.loads((run / "state.json").read_text())["stages"]
    assert state["pretrain"]["status"] == state["sft"]["status"] == "done"
    assert state["pretrain"]["budget"]["max_tokens"] == 2560 and state["pretrain"]["summary"]["steps"] == 10


def _cosine(step: int, total: int, peak: float = 1e-3, warmup: int = 4) -> float:
    """The fault spec's cosine (warmup 4, min_lr 0) written out here, for the lr of 0-based `step`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / (total - warmup))))


def test_extending_by_steps_recomputes_the_cosine_and_says_what_it_does(llmforge, reference, tmp_path):
    run = copy_run(reference, tmp_path / "run")
    extended = llmforge("--run-dir", str(run), "stages.1.train.max_steps=50", "--resume", "--allow-spec-change")
    assert extended.returncode == 0, extended.output[-4000:]
    out = extended.stdout
    assert "[pretrain] budget changed (max_steps 40 -> max_steps 50): it trains on from its final checkpoint" in out
    assert f"[pretrain] resumed from {run}/checkpoints/pretrain/step-40 at step 40" in out
    assert (f"[pretrain] 40 -> 50 steps: lr of step 41, the next: {_cosine(40, 40):.2e} before, {_cosine(40, 50):.2e} now "
            "(cosine over 50 steps: a jump back up)") in out
    lr = {r["step"]: r["lr"] for r in rows(run)}
    assert list(lr) == list(range(1, 51))
    assert all(lr[s] == {r["step"]: r["lr"] for r in rows(reference)}[s] for s in range(1, 41))  # the finished part stays
    assert [lr[s] for s in range(41, 51)] == pytest.approx([_cosine(s - 1, 50) for s in range(41, 51)], rel=1e-12, abs=0)
    assert lr[41] > 10 * lr[40]
    assert steps_saved(run)[-1] == 50 and [r["step"] for r in rows(run, "eval")] == [20, 40, 50]

    # Below where the stage is: refused with both numbers, before any work.
    before = (run / "state.json").read_text(), losses(run)
    shrunk = llmforge("--run-dir", str(run), "stages.1.train.max_steps=45", "--resume", "--allow-spec-change")
    assert shrunk.returncode == 2, shrunk.output[-4000:]
    assert "max_steps 45 is below the 50 steps it has already trained" in shrunk.stderr
    assert "stages.1.train.max_steps=50 or more" in shrunk.stderr
    # A token budget is counted in steps by the loader: refused when the stage has its checkpoint in hand.
    tokens = llmforge("--run-dir", str(run), "stages.1.train.max_steps=null", "stages.1.train.max_tokens=2560", "--resume",
                      "--allow-spec-change")
    assert tokens.returncode == 2, tokens.output[-4000:]
    assert "stage 'pretrain': max_tokens 2560 gives 10 steps, but the stage has already trained 50" in tokens.stderr
    assert losses(run) == before[1] and steps_saved(run)[-1] == 50
