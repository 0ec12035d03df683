"""A lost rank (promise 13): the survivor exits in bounded time with a clear message, never hangs.

The ranks are launched by hand, as srun launches them, so no torchrun agent tears the job
down: the survivor must notice on its own, within parallelism.collective_timeout_s.
"""

from __future__ import annotations

import signal
import time

import pytest

from tests.fault.test_preemption import _wait_stopped

pytestmark = pytest.mark.slow

TIMEOUT = ["parallelism.collective_timeout_s=8"]


def test_a_killed_rank_ends_the_other_with_a_clear_message(llmforge, tmp_path):
    job = llmforge.ranks("--run-dir", str(tmp_path / "run"), *TIMEOUT, env={1: {"LLMFORGE_FAULT": "step_before_reduce@5"}})
    assert job.wait(600, index=1) == -9  # rank 1 died in the middle of step 5
    died = time.monotonic()
    code = job.wait(60, index=0)
    survivor = job.result(0)
    assert code == 1, survivor.output[-4000:]
    assert time.monotonic() - died < 8 + 5
    assert "error: lost contact with another rank" in survivor.stderr and "--resume" in survivor.stderr
    assert "Traceback" not in survivor.stderr


def test_a_hung_rank_ends_the_other_after_the_collective_timeout(llmforge, tmp_path):
    job = llmforge.ranks("--run-dir", str(tmp_path / "run"), *TIMEOUT, env={1: {"LLMFORGE_FAULT": "step_before_reduce@5:hang"}})
    try:
        _wait_stopped(job.pids[1])
        hung = time.monotonic()
        code = job.wait(120, index=0)
        waited = time.monotonic() - hung
    finally:
        job.signal(signal.SIGKILL, 1)
        job.wait(60)
    survivor = job.result(0)
    assert code == 1, survivor.output[-4000:]
    assert 8 - 3 < waited < 8 + 15, waited  # it waited for the timeout, and no longer
    assert "did not answer within parallelism.collective_timeout_s (8 s)" in survivor.stderr
    assert "Traceback" not in survivor.stderr
