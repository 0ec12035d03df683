"""SIGTERM (promise 12): a final complete checkpoint within checkpoint.preempt_timeout, exit 75, an exact resume."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from llmforge.runtime.train import EXIT_PREEMPTED
from tests.fault.harness import assert_same_weights, losses, steps_saved

pytestmark = pytest.mark.slow

# The run stops itself (SIGSTOP) right after step 23, so that SIGTERM lands at a known point. Python
# runs the handler at its next check, which may come after the loop looked at step 23: so 23 or 24.
PAUSE_AT_23 = {"LLMFORGE_FAULT": "train_step@23:hang"}


def _wait_stopped(pid: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T":
            return
        time.sleep(0.05)
    raise TimeoutError(f"process {pid} did not reach its pause")


def _terminate_at_23(job) -> float:
    """SIGTERM the paused run, let it go on, and return the seconds until it exits."""
    _wait_stopped(job.pids[0])
    job.signal(signal.SIGTERM)
    started = time.monotonic()
    job.signal(signal.SIGCONT)
    job.wait(300)
    return time.monotonic() - started


def test_sigterm_writes_a_final_checkpoint_exits_75_and_resumes_exactly(llmforge, reference, tmp_path):
    run = tmp_path / "run"
    job = llmforge.start("--run-dir", str(run), "checkpoint.preempt_timeout=60", env=PAUSE_AT_23)
    seconds = _terminate_at_23(job)
    stopped = job.result()
    assert stopped.returncode == EXIT_PREEMPTED == 75, stopped.output[-4000:]
    assert seconds < 60
    final = max(losses(run))
    assert final in (23, 24)
    assert "SIGTERM: checkpoint" in stopped.stderr and f"step-{final} written" in stopped.stderr and "--resume" in stopped.stderr
    assert steps_saved(run) == [20, final]  # complete: marker and checksums

    resumed = llmforge("--run-dir", str(run), "checkpoint.preempt_timeout=60", "--resume")
    assert resumed.returncode == 0, resumed.output[-4000:]
    assert f"step-{final} at step {final}" in resumed.stdout
    assert losses(run) == losses(reference)  # bitwise
    assert_same_weights(run / "checkpoints/pretrain/step-40", reference / "checkpoints/pretrain/step-40")


def test_sigterm_waits_for_the_checkpoint_being_written_in_the_background(llmforge, reference, tmp_path):
    run = tmp_path / "run"
    # Step 10's writer thread takes 4 s more after its shards (a slow disk); the run pauses itself
    # after step 12 (SIGSTOP), so SIGTERM lands at a known step however fast the steps are
    # (watching metrics.jsonl for step 12 let it run on to step 21 once steps got quicker).
    overrides = ("checkpoint.preempt_timeout=60", "checkpoint.async_save=true")
    job = llmforge.start("--run-dir", str(run), *overrides, env={"LLMFORGE_FAULT": "ckpt_after_shard@1:stall=4,train_step@12:hang"})
    _wait_stopped(job.pids[0])
    assert (run / "checkpoints/pretrain/.tmp-step-10").is_dir()  # still being written when the signal comes
    job.signal(signal.SIGTERM)
    job.signal(signal.SIGCONT)
    job.wait(300)
    stopped = job.result()
    assert stopped.returncode == EXIT_PREEMPTED, stopped.output[-4000:]
    final = max(losses(run))
    assert final in (12, 13) and steps_saved(run) == [10, final]  # step 10 completed first, then the final one
    log = stopped.stdout
    assert log.index("step-10 (written in the background)") < log.index(f"checkpoint saved: {run / 'checkpoints/pretrain'}/step-{final}")

    resumed = llmforge("--run-dir", str(run), *overrides, "--resume")
    assert resumed.returncode == 0, resumed.output[-4000:]
    assert losses(run) == losses(reference)  # bitwise
    assert_same_weights(run / "checkpoints/pretrain/step-40", reference / "checkpoints/pretrain/step-40")


# A save that never finishes: the watchdog must end the process by the deadline, not the scheduler's SIGKILL.
STUCK_SAVE = """
import time
from llmforge.runtime import checkpoint
save = checkpoint.CheckpointManager.save
def stuck(self, step, *args, **kwargs):
    if step > 20:
        time.sleep(3600)
    return save(self, step, *args, **kwargs)
checkpoint.CheckpointManager.save = stuck
"""


def test_a_final_checkpoint_that_cannot_finish_in_time_still_ends_the_process(llmforge, tmp_path):
    run = tmp_path / "run"
    job = llmforge.start("--run-dir", str(run), "checkpoint.preempt_timeout=3", env=PAUSE_AT_23, prelude=STUCK_SAVE)
    seconds = _terminate_at_23(job)
    stopped = job.result()
    assert stopped.returncode == EXIT_PREEMPTED, stopped.output[-4000:]
    assert 2.5 < seconds < 30
    assert "did not complete within checkpoint.preempt_timeout = 3 s" in stopped.stderr
    assert steps_saved(run) == [10, 20]  # the newest complete one stands


def _descendants(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children")
    direct = [int(c) for c in children.read_text().split()] if children.exists() else []
    return direct + [d for c in direct for d in _descendants(c)]


def test_sigterm_to_a_torchrun_job_reaches_every_rank_and_exits_75(llmforge, reference, tmp_path):
    run = tmp_path / "run"
    args = ("--run-dir", str(run), "--nproc-per-node", "2")
    job = llmforge.start(*args, env=PAUSE_AT_23)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # both ranks paused after step 23, under torchrun
        ranks = [p for p in _descendants(job.pids[0]) if b"torch.distributed.run" not in Path(f"/proc/{p}/cmdline").read_bytes()]
        states = [Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0] for p in ranks]
        if len(ranks) == 2 and states == ["T", "T"]:
            break
        time.sleep(0.1)
    else:
        job.kill()
        raise TimeoutError("the ranks did not pause")
    os.kill(job.pids[0], signal.SIGTERM)  # what a scheduler does: signal `llmforge run`, which passes it on
    time.sleep(1)
    for rank in ranks:
        os.kill(rank, signal.SIGCONT)
    assert job.wait(120) == [EXIT_PREEMPTED], job.result().output[-4000:]
    final = steps_saved(run)[-1]
    assert final in (23, 24) and steps_saved(run) == [20, final]  # both ranks saved the same step together

    resumed = llmforge(*args, "--resume", timeout=600)
    assert resumed.returncode == 0, resumed.output[-4000:]
    want, got = losses(reference), losses(run)
    assert list(got) == list(range(1, 41))
    for step in range(final + 1, 41):  # two ranks sum in another order than one: ~1e-7 apart
        assert got[step] == pytest.approx(want[step], rel=1e-5), step
