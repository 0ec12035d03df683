"""`llmforge status` on real runs (issue 33): finished, running, preempted, stopped on a NaN, killed."""

from __future__ import annotations

import shlex
import signal

import pytest

from llmforge.runtime.status import render, run_status
from tests.fault.harness import losses, steps_saved
from tests.fault.test_preemption import PAUSE_AT_23, _wait_stopped

pytestmark = pytest.mark.slow


def test_a_finished_run(reference):
    s = run_status(reference)
    prepare, pretrain = s["stages"]
    assert prepare["state"] == pretrain["state"] == "done"
    assert (pretrain["step"], pretrain["total"], pretrain["tokens"]) == (40, 40, 40 * 8 * 32)
    assert pretrain["train"]["step"] == 40 and pretrain["train"]["loss"] == losses(reference)[40]
    assert pretrain["eval"]["step"] == 40 and pretrain["eval"]["val_loss"] > 0
    assert pretrain["checkpoint"]["path"] == str(reference / "checkpoints/pretrain/step-40")
    assert s["last_attempt"]["reason"] == "finished" and s["last_attempt"]["code"] == 0
    assert not s["lock"]["held"] and s["lock"]["alive"] is False  # the run's process is gone
    assert s["next"] == "done" and s["continue"] is None


def test_a_running_run_then_preempted_then_continued_by_the_command_it_gives(llmforge, spec, tmp_path):
    run = tmp_path / "run"
    job = llmforge.start("--run-dir", str(run), "checkpoint.preempt_timeout=60", env=PAUSE_AT_23)
    try:
        _wait_stopped(job.pids[0])  # alive, paused after step 23, holding the lock
        s = run_status(run)
        pretrain = s["stages"][1]
        assert pretrain["state"] == "running" and pretrain["pid"] == job.pids[0] == s["lock"]["pid"]
        assert pretrain["step"] == 22 and pretrain["checkpoint"]["step"] == 20 and pretrain["total"] == 40  # rows: up to 22
        assert s["lock"]["held"] and s["lock"]["alive"] and s["last_attempt"]["reason"] == "running" and s["next"] == "running"
        assert f"  running: `kill -TERM {job.pids[0]}` stops it with a final checkpoint (exit 75)" in render(s)
    except BaseException:
        job.kill()
        raise

    job.signal(signal.SIGTERM)
    job.signal(signal.SIGCONT)
    assert job.wait(300) == [75], job.result().output[-4000:]
    s = run_status(run)
    final = steps_saved(run)[-1]
    assert s["stages"][1]["state"] == "stopped" and s["stages"][1]["checkpoint"]["step"] == final in (23, 24)
    attempt = s["last_attempt"]
    assert (attempt["reason"], attempt["code"], attempt["stage"]) == ("preempted", 75, "pretrain")
    assert attempt["message"].startswith(f"[pretrain] SIGTERM: checkpoint {run}/checkpoints/pretrain/step-{final} written")
    assert s["next"] == "resume" and not s["lock"]["held"]
    assert s["continue"] == f"llmforge run {spec} checkpoint.preempt_timeout=60 --run-dir {run} --resume"
    assert "last attempt: preempted (exit 75)" in "\n".join(render(s))

    words = shlex.split(s["continue"])
    continued = llmforge.server.start([{"argv": words[1:], "env": {}}])
    assert continued.wait(300) == [0], continued.result().output[-4000:]
    s = run_status(run)
    assert s["next"] == "done" and s["stages"][1]["step"] == 40 and s["last_attempt"]["reason"] == "finished"


def test_a_run_stopped_on_a_nan(llmforge, tmp_path):
    run = tmp_path / "run"
    stopped = llmforge("--run-dir", str(run), "stages.1.train.max_steps=8", "stages.1.train.on_nonfinite=stop",
                       env={"LLMFORGE_FAULT_NAN_STEP": "5"})
    assert stopped.returncode == 1, stopped.output[-4000:]
    s = run_status(run)
    attempt = s["last_attempt"]
    assert (attempt["reason"], attempt["code"]) == ("stopped", 1)
    assert attempt["message"].startswith("[pretrain] non-finite loss or gradient at step 5")
    assert s["stages"][1]["state"] == "stopped" and s["stages"][1]["step"] == 4 and s["next"] == "fix"
    assert any(line.startswith("  continue, once the cause is fixed: llmforge run ") for line in render(s))


def test_a_killed_run(killed_at_27):
    s = run_status(killed_at_27)
    pretrain = s["stages"][1]
    assert s["last_attempt"]["reason"] == "killed" and s["last_attempt"]["code"] is None
    assert pretrain["state"] == "stopped" and pretrain["step"] == 26 and pretrain["checkpoint"]["step"] == 20
    assert s["lock"]["alive"] is False and not s["lock"]["held"] and s["next"] == "resume"
    assert "last attempt: killed: no exit record" in "\n".join(render(s))
