"""`llmforge status` on run dirs laid out as runs leave them (the real runs: tests/fault/test_status.py)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest
import yaml

from llmforge.cli import main
from llmforge.runtime import status as status_module
from llmforge.runtime.metrics import read_rows
from llmforge.runtime.rundir import RunDir
from llmforge.runtime.status import render, run_status

SPEC = {"name": "t", "stages": [{"name": "prepare", "type": "prepare"},
                                {"name": "pretrain", "type": "pretrain", "train": {"max_steps": 40}}]}
COMMAND = ["run", "/abs/spec.yaml", "stages.1.train.max_steps=40"]


def _run_dir(tmp_path, *, stages: dict, exit: dict | None, checkpoint: int | None = 20) -> RunDir:
    run = RunDir(tmp_path / "run")
    run.path.mkdir(parents=True)
    (run.path / "spec.resolved.yaml").write_text(yaml.safe_dump(SPEC))
    state = {"version": 1, "stages": stages, "attempt": {"pid": 1, "host": "h", "started": time.time() - 60, "command": COMMAND}}
    if exit is not None:
        state["exit"] = {"at": time.time() - 5, "message": "", "stage": "pretrain", **exit}
    (run.path / "state.json").write_text(json.dumps(state))
    rows = [{"kind": "train", "stage": "pretrain", "step": s, "tokens": 256 * s, "loss": 4.0 - s / 100, "lr": 1e-3} for s in range(1, 24)]
    rows.insert(20, {"kind": "eval", "stage": "pretrain", "step": 20, "tokens": 5120, "val_loss": 3.5, "val_ppl": 33.1})
    (run.path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"kind": "tra')  # a torn last line
    if checkpoint is not None:
        step_dir = run.checkpoints("pretrain") / f"step-{checkpoint}"
        step_dir.mkdir(parents=True)
        (step_dir / "trainer_state.json").write_text(json.dumps({"step": checkpoint, "total": 40, "tokens": 256 * checkpoint}))
        (step_dir / "COMPLETE").write_text("{}")
        (run.checkpoints("pretrain") / "step-23").mkdir()  # no marker: not complete
    (run.path / ".lock").write_text("pid 4194999 on " + socket.gethostname() + "\n")  # a pid that does not exist
    return run


RUNNING = {"prepare": {"status": "done"}, "pretrain": {"status": "running"}}


def test_a_preempted_run_says_stopped_why_where_and_how_to_continue(tmp_path):
    run = _run_dir(tmp_path, stages=RUNNING, exit={"reason": "preempted", "code": 75, "message": "[pretrain] SIGTERM: checkpoint written"})
    s = run_status(run.path)
    pretrain = s["stages"][1]
    assert (s["stages"][0]["state"], pretrain["state"], pretrain["pid"]) == ("done", "stopped", None)
    assert (pretrain["step"], pretrain["total"], pretrain["tokens"]) == (23, 40, 23 * 256)  # the last train row is past the checkpoint
    assert pretrain["train"]["loss"] == pytest.approx(3.77) and pretrain["eval"]["val_loss"] == 3.5
    assert pretrain["checkpoint"]["step"] == 20 and pretrain["checkpoint"]["age_s"] < 60
    assert s["last_attempt"]["reason"] == "preempted" and s["last_attempt"]["code"] == 75
    assert (s["lock"]["held"], s["lock"]["pid"], s["lock"]["alive"]) == (False, 4194999, False)
    assert s["next"] == "resume" and s["progress"] == "prepare=done pretrain=20"
    assert s["continue"] == f"llmforge run /abs/spec.yaml stages.1.train.max_steps=40 --run-dir {run.path.resolve()} --resume"
    text = "\n".join(render(s))
    assert "last attempt: preempted (exit 75), 5 s ago: [pretrain] SIGTERM" in text
    assert "pretrain  stopped  step 23/40  tokens 5,888" in text and "eval @ 20: val_loss 3.5000, val_ppl 33.1000" in text
    assert f"continue: {s['continue']}" in text and "gone" in text


def test_a_live_lock_means_running_with_the_pid_that_holds_it(tmp_path):
    run = _run_dir(tmp_path, stages=RUNNING, exit=None)
    run.lock()  # this process: the probe's own shared flock must fail against it
    try:
        s = run_status(run.path)
    finally:
        run.unlock()
    assert s["stages"][1]["state"] == "running" and s["stages"][1]["pid"] == os.getpid()
    assert s["lock"]["held"] and s["lock"]["alive"] and s["last_attempt"]["reason"] == "running"
    assert s["next"] == "running" and s["continue"] is None
    assert f"kill -TERM {os.getpid()}" in "\n".join(render(s))


def test_no_exit_record_and_no_live_process_is_a_killed_attempt(tmp_path):
    s = run_status(_run_dir(tmp_path, stages=RUNNING, exit=None).path)
    assert s["last_attempt"]["reason"] == "killed" and "no exit record" in s["last_attempt"]["message"]
    assert s["stages"][1]["state"] == "stopped" and s["next"] == "resume"


def test_a_stop_asks_for_a_fix_and_a_finished_run_for_nothing(tmp_path):
    stopped = run_status(_run_dir(tmp_path / "a", stages=RUNNING, exit={
        "reason": "stopped", "code": 1, "message": "[pretrain] non-finite loss or gradient at step 5"}).path)
    assert stopped["next"] == "fix" and "continue, once the cause is fixed:" in "\n".join(render(stopped))
    done = run_status(_run_dir(tmp_path / "b", stages={"prepare": {"status": "done"}, "pretrain": {"status": "done", "summary": {"steps": 40}}},
                               exit={"reason": "finished", "code": 0}).path)
    assert done["next"] == "done" and done["continue"] is None and done["stages"][1]["state"] == "done"
    assert done["progress"] == "prepare=done pretrain=done"


def test_metrics_are_read_from_the_end_across_blocks(tmp_path, monkeypatch):
    run = _run_dir(tmp_path, stages=RUNNING, exit=None)
    monkeypatch.setattr(status_module, "_BLOCK", 37)  # lines cut across many blocks
    assert list(status_module._rows_backwards(run.metrics)) == list(reversed(read_rows(run.metrics)))


def test_the_command(tmp_path, capsys):
    run = _run_dir(tmp_path, stages=RUNNING, exit={"reason": "preempted", "code": 75})
    assert main(["status", str(run.path), "--field", "next"]) == 0 and capsys.readouterr().out == "resume\n"
    assert main(["status", str(run.path), "--json"]) == 0 and json.loads(capsys.readouterr().out)["last_attempt"]["code"] == 75
    assert main(["status", str(run.path), "--field", "nxt"]) == 2 and "pick one of: run_dir, name" in capsys.readouterr().err
    assert main(["status", str(tmp_path)]) == 2 and "holds no llmforge run" in capsys.readouterr().err


@pytest.mark.slow
def test_status_does_not_import_torch(tmp_path):
    run = _run_dir(tmp_path, stages=RUNNING, exit=None)
    code = ("import sys; from llmforge.cli import main; assert main(['status', sys.argv[1]]) == 0; "
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'megatron')); assert not heavy, heavy")
    proc = subprocess.run([sys.executable, "-c", code, str(run.path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
