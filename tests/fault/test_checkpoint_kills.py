"""SIGKILL inside checkpoint saves (promise 1) and retention under a kill (promise 5)."""

from __future__ import annotations

import itertools
import subprocess
import sys

import pytest

from llmforge.runtime.checkpoint import MARKER, CheckpointManager, verify
from tests.fault.harness import ROOT, assert_same_weights, clean_env, losses, steps_saved

pytestmark = pytest.mark.slow

POINTS = ("ckpt_after_shard", "ckpt_before_rename", "ckpt_before_marker")

# A training process as the checkpoint layer sees it: resume from the newest complete
# checkpoint, then save one step after another, each with a few shard files.
TRAINER = """
import os, sys
from pathlib import Path
from llmforge.runtime.checkpoint import CheckpointManager
root, keep_last = Path(sys.argv[1]), int(sys.argv[2])
mgr = CheckpointManager(root, keep_last=keep_last, log=lambda m: None)
mgr.cleanup_temp()
latest = mgr.latest()
step = int(latest.name.split("-")[1]) if latest else 0
def write(tmp):
    (tmp / "model").mkdir()
    for shard in range(3):
        (tmp / "model" / f"__{shard}_0.distcp").write_bytes(os.urandom(8192))
for step in range(step + 1, step + 20):
    mgr.save(step, write, {"version": 1, "step": step})
"""


def _complete(root):
    return [s for s, _ in CheckpointManager(root, keep_last=1, log=lambda m: None).complete()]


def test_sigkill_inside_saves_21_times_only_complete_checkpoints_are_chosen(tmp_path):
    root = tmp_path / "ckpt"
    newest = 0
    kills = list(itertools.product(range(1, 8), POINTS))  # 21 kills, at every point, early and late in a process
    for n, (nth, point) in enumerate(kills):
        keep_last = 1 + n % 2
        env = clean_env() | {"LLMFORGE_FAULT": f"{point}@{nth}"}
        proc = subprocess.run([sys.executable, "-c", TRAINER, str(root), str(keep_last)], cwd=ROOT, env=env,
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
