"""SIGKILL inside checkpoint saves (promise 1), also while one is written in the background, and retention under a kill (promise 5)."""

from __future__ import annotations

import itertools
import signal
import subprocess
import sys
import time

import pytest

from llmforge.runtime.checkpoint import MARKER, CheckpointManager, verify
from tests.fault.harness import ROOT, assert_same_weights, clean_env, losses, steps_saved

pytestmark = pytest.mark.slow

POINTS = ("ckpt_after_shard", "ckpt_before_rename", "ckpt_before_marker")

# A training process as the checkpoint layer sees it: resume from the newest complete
# checkpoint, then save one step after another, each with a few shard files; `async`
# writes them in the background (the fault points then fire in the writer thread).
TRAINER = """
import os, sys
from pathlib import Path
from llmforge.runtime.checkpoint import CheckpointManager
root, keep_last, background = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "async"
mgr = CheckpointManager(root, keep_last=keep_last, log=lambda m: None)
mgr.cleanup_temp()
latest = mgr.latest()
step = int(latest.name.split("-")[1]) if latest else 0
def write(tmp):
    (tmp / "model").mkdir(exist_ok=True)
    for shard in range(3):
        (tmp / "model" / f"__{shard}_0.distcp").write_bytes(os.urandom(8192))
class Staged:
    def __init__(self, tmp):
        self.tmp = tmp
    def write(self):
        write(self.tmp)
    def finish(self, parts):
        pass
for step in range(step + 1, step + 20):
    if background:
        mgr.save_async(step, Staged, {"version": 1, "step": step})
    else:
        mgr.save(step, write, {"version": 1, "step": step})
mgr.settle()
"""


def _complete(root):
    return [s for s, _ in CheckpointManager(root, keep_last=1, log=lambda m: None).complete()]


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_sigkill_inside_saves_21_times_only_complete_checkpoints_are_chosen(tmp_path, mode):
    root = tmp_path / "ckpt"
    newest = 0
    kills = list(itertools.product(range(1, 8), POINTS))  # 21 kills, at every point, early and late in a process
    for n, (nth, point) in enumerate(kills):
        keep_last = 1 + n % 2
        env = clean_env() | {"LLMFORGE_FAULT": f"{point}@{nth}"}
        proc = subprocess.run([sys.executable, "-c", TRAINER, str(root), str(keep_last), mode], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == -9, proc.stderr  # killed, by the fault, inside save number `nth`
        newest += nth - 1  # the saves before it completed
        mgr = CheckpointManager(root, keep_last=keep_last, log=lambda m: None)
        latest = mgr.latest()
        if newest == 0:
            assert latest is None
            continue
        assert latest is not None and latest.name == f"step-{newest}", (point, nth, sorted(p.name for p in root.iterdir()))
        assert verify(latest)["step"] == newest
        assert 1 <= len(_complete(root)) <= keep_last + 1  # retention never leaves zero complete ones
        # What the kill left behind: a temp dir, or a renamed dir without its marker; and maybe
        # retired checkpoints whose background deletion the kill interrupted.
        leftovers = sorted(p.name for p in root.iterdir() if not (p / MARKER).exists() and not p.name.startswith(".tmp-retired-"))
        assert leftovers in ([f".tmp-step-{newest + 1}"], [f"step-{newest + 1}"]), (point, leftovers)
    # The next start cleans them up.
    mgr = CheckpointManager(root, keep_last=2, log=lambda m: None)
    mgr.cleanup_temp()
    assert all((p / MARKER).exists() for p in root.iterdir())
    assert newest >= 60


def test_keep_last_1_survives_kills_inside_the_next_saves(llmforge, reference, tmp_path):
    run = tmp_path / "run"
    keep = "checkpoint.keep_last=1"

    first = llmforge("--run-dir", str(run), keep, env={"LLMFORGE_FAULT": "ckpt_after_shard@2"})
    assert first.returncode == -9, first.output[-3000:]
    assert steps_saved(run) == [10]
    assert any((run / "checkpoints/pretrain/.tmp-step-20/model").iterdir())  # real shards were written

    second = llmforge("--run-dir", str(run), keep, "--resume", env={"LLMFORGE_FAULT": "ckpt_before_rename"})
    assert second.returncode == -9, second.output[-3000:]
    assert "removed incomplete checkpoint" in second.stdout and ".tmp-step-20" in second.stdout
    assert "step-10 at step 10" in second.stdout
    assert steps_saved(run) == [10]

    third = llmforge("--run-dir", str(run), keep, "--resume", env={"LLMFORGE_FAULT": "ckpt_before_marker@2"})
    assert third.returncode == -9, third.output[-3000:]
    assert steps_saved(run) == [20]  # step 10 went once 20 was complete, not before
    assert (run / "checkpoints/pretrain/step-30").is_dir() and not (run / "checkpoints/pretrain/step-30" / MARKER).exists()

    last = llmforge("--run-dir", str(run), keep, "--resume")
    assert last.returncode == 0, last.output[-3000:]
    assert "step-30" in last.stdout and "removed incomplete checkpoint" in last.stdout
    assert sorted(p.name for p in (run / "checkpoints/pretrain").iterdir()) == ["step-40"]
    assert losses(run) == losses(reference)
    assert_same_weights(run / "checkpoints/pretrain/step-40", reference / "checkpoints/pretrain/step-40")


def _wait_for_step(job, run, step: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (run / "metrics.jsonl").exists() and max(losses(run), default=0) >= step:
            return
        time.sleep(0.05)
    job.kill()
    raise TimeoutError(f"{run} did not reach step {step}:\n" + job.result().output[-4000:])


def test_a_kill_while_a_checkpoint_is_written_in_the_background_keeps_the_previous_one(llmforge, reference, tmp_path):
    run = tmp_path / "run"
    # Saves at 5, 10, 15 (none at an eval step, where the loop would wait), written in the background.
    overrides = ("checkpoint.interval=5", "checkpoint.async_save=true")
    # Step 10's writer thread stalls after its shards (a write stuck on a dead disk); the training
    # thread goes on, and its next save, at step 15, waits for step 10's.
    job = llmforge.start("--run-dir", str(run), *overrides, env={"LLMFORGE_FAULT": "ckpt_after_shard@2:stall"})
    _wait_for_step(job, run, 15)
    assert job.server.read(1.0) is None  # still alive: held by the save of step 10, not exited
    job.signal(signal.SIGKILL)
    assert job.wait(60) == [-9]
    assert max(losses(run)) == 15  # five steps trained while step 10 was being written
    assert steps_saved(run) == [5]  # the previous complete checkpoint is the newest
    assert any((run / "checkpoints/pretrain/.tmp-step-10/model").iterdir())  # step 10's shards, no marker

    resumed = llmforge("--run-dir", str(run), *overrides, "--resume")
    assert resumed.returncode == 0, resumed.output[-4000:]
    assert "removed incomplete checkpoint" in resumed.stdout and "step-5 at step 5" in resumed.stdout
    assert losses(run) == losses(reference)  # bitwise
    assert_same_weights(run / "checkpoints/pretrain/step-40", reference / "checkpoints/pretrain/step-40")


def test_a_checkpoint_written_in_the_background_is_the_one_written_at_once(llmforge, reference, tmp_path):
    """The reference writes its checkpoints at once (the CPU's default); the same run writing in the background matches bitwise."""
    run = tmp_path / "run"
    done = llmforge("--run-dir", str(run), "checkpoint.async_save=true")
    assert done.returncode == 0, done.output[-4000:]
    assert "step-30 (written in the background)" in done.stdout
    assert "written in the background" not in (reference / "run.log").read_text()
    assert losses(run) == losses(reference)
    for step in (30, 40):  # the last one is written at once either way
        assert_same_weights(run / f"checkpoints/pretrain/step-{step}", reference / f"checkpoints/pretrain/step-{step}")
