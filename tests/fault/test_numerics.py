"""Bad numbers: a NaN loss (promise 7) and a loss spike (promise 8), injected at a chosen step.

`LLMFORGE_FAULT_NAN_STEP` multiplies that step's loss by NaN before the backward pass,
`LLMFORGE_FAULT_SPIKE_STEP` by 100; the guards see what a real bad batch produces.
"""

from __future__ import annotations

import math

import pytest

from tests.fault.harness import assert_same_weights, losses, rows, steps_saved

pytestmark = pytest.mark.slow

# 12 steps, a checkpoint after every one, spikes judged from the 5th recorded loss on.
SHORT = ["stages.1.train.max_steps=12", "stages.1.train.eval_interval=12", "checkpoint.interval=1", "checkpoint.keep_last=12",
         "stages.1.train.spike.warmup_steps=5"]
NAN_5 = {"LLMFORGE_FAULT_NAN_STEP": "5"}
SPIKE_10 = {"LLMFORGE_FAULT_SPIKE_STEP": "10"}


def _ckpt(run, step):
    return run / "checkpoints/pretrain" / f"step-{step}"


@pytest.fixture(scope="module")
def skipping(llmforge, fault_dir):
    """NaN at step 5 and a 100× spike at step 10, both policies `skip`."""
    run = fault_dir / "skipping"
    done = llmforge("--run-dir", str(run), *SHORT, "stages.1.train.on_nonfinite=skip", "stages.1.train.on_spike=skip",
                    env=NAN_5 | SPIKE_10)
    assert done.returncode == 0, done.output[-4000:]
    return run, done


@pytest.fixture(scope="module")
def stopped_at_spike(llmforge, fault_dir):
    """A 100× spike at step 10 with on_spike: stop; then the same run resumed without the fault."""
    run = fault_dir / "spike-stop"
    stopped = llmforge("--run-dir", str(run), *SHORT, "stages.1.train.on_spike=stop", env=SPIKE_10)
    saved = steps_saved(run)
    resumed = llmforge("--run-dir", str(run), *SHORT, "stages.1.train.on_spike=stop", "--resume")
    return run, stopped, saved, resumed


def test_nan_with_skip_drops_the_update_and_counts_it(skipping):
    run, done = skipping
    by_step = {r["step"]: r for r in rows(run)}
    assert math.isnan(by_step[5]["loss"]) and by_step[5]["skipped_steps"] == 1 and by_step[4]["skipped_steps"] == 0
    assert "step 5: non-finite loss or gradient, step skipped (1 so far)" in done.stdout
    # The skipped step left the parameters and the optimizer state as step 4 had them; step 6 moved on.
    assert_same_weights(_ckpt(run, 4), _ckpt(run, 5))
    with pytest.raises(AssertionError):
        assert_same_weights(_ckpt(run, 5), _ckpt(run, 6))


def test_spike_with_skip_drops_the_update_and_counts_it(skipping):
    run, done = skipping
    by_step = {r["step"]: r for r in rows(run)}
    assert by_step[10]["loss"] > 50 * by_step[9]["loss"]  # the injected 100×
    assert by_step[10]["spikes"] == 1 and by_step[10]["skipped_steps"] == 2 and by_step[9]["spikes"] == 0
    assert "step 10: loss spike" in done.stdout and "update skipped" in done.stdout
    assert_same_weights(_ckpt(run, 9), _ckpt(run, 10))
    assert by_step[11]["loss"] < 2 * by_step[9]["loss"]  # training goes on as if the batch had not been seen
    assert rows(run)[-1]["step"] == 12


def test_nan_with_stop_exits_non_zero_and_writes_nothing_after_it(llmforge, fault_dir, stopped_at_spike):
    run = fault_dir / "nan-stop"
    stopped = llmforge("--run-dir", str(run), *SHORT, "stages.1.train.on_spike=stop", env=NAN_5)
    assert stopped.returncode == 1, stopped.output[-4000:]
    assert "non-finite loss or gradient at step 5" in stopped.stderr and "parameters were not updated" in stopped.stderr
    assert "Traceback" not in stopped.stderr
    assert max(steps_saved(run)) == 4 and not list((run / "checkpoints/pretrain").glob("*step-5"))
    assert max(losses(run)) == 4  # no row from the NaN step on
    # Resumed without the fault, it is the clean run: nothing of the NaN step survived the stop.
    resumed = llmforge("--run-dir", str(run), *SHORT, "stages.1.train.on_spike=stop", "--resume")
    assert resumed.returncode == 0, resumed.output[-4000:]
    clean = stopped_at_spike[0]  # clean up to its spike at 10, then resumed cleanly from 9
    assert losses(run) == losses(clean)
    assert_same_weights(_ckpt(run, 12), _ckpt(clean, 12))


def test_spike_with_stop_exits_non_zero_before_the_update(stopped_at_spike):
    run, stopped, saved, resumed = stopped_at_spike
    assert stopped.returncode == 1, stopped.output[-4000:]
    assert "step 10: loss spike" in stopped.stderr and "running mean" in stopped.stderr
    assert "parameters were not updated" in stopped.stderr and "Traceback" not in stopped.stderr
    assert max(saved) == 9
    assert resumed.returncode == 0, resumed.output[-4000:]
    assert "resumed from" in resumed.stdout and "step-9 at step 9" in resumed.stdout


def test_200_clean_steps_raise_no_false_spike(llmforge, fault_dir):
    run = fault_dir / "clean-200"
    done = llmforge("--run-dir", str(run), "stages.1.train.max_steps=200", "stages.1.train.eval_interval=200",
                    "stages.1.train.on_spike=stop", "checkpoint.interval=200")
    assert done.returncode == 0, done.output[-4000:]
    train = rows(run)
    assert len(train) == 200 and train[-1]["spikes"] == 0 and train[-1]["skipped_steps"] == 0
