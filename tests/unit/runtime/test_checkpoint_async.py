"""Saves in the background: complete only once written, one at a time, failures raised later, ranks that wait for each other."""

from __future__ import annotations

import errno
import json
import threading
from pathlib import Path

import pytest

from llmforge.runtime.checkpoint import CheckpointManager, CheckpointWriteError, read_trainer_state, verify


class Staged:
    """What a stage's snapshot leaves to write: one shard per rank, then rank 0's index of every rank's part."""

    def __init__(self, tmp: Path, payload: bytes, rank: int = 0, go: threading.Event | None = None,
                 fail: BaseException | None = None):
        self.tmp, self.payload, self.rank, self.go, self.fail = tmp, payload, rank, go, fail

    def write(self) -> dict:
        if self.go is not None:
            assert self.go.wait(30)
        if self.fail is not None:
            raise self.fail
        (self.tmp / "model" / f"shard-{self.rank}.bin").write_bytes(self.payload)
        return {"rank": self.rank, "size": len(self.payload)}

    def finish(self, parts: list[dict]) -> None:
        (self.tmp / "model" / "index.json").write_text(json.dumps(parts))


def _stage(payload: bytes, **kwargs):
    def stage(tmp: Path) -> Staged:
        (tmp / "model").mkdir(exist_ok=True)
        return Staged(tmp, payload, **kwargs)

    return stage


def _write(tmp: Path) -> None:
    (tmp / "model").mkdir()
    (tmp / "model" / "shard-0.bin").write_bytes(b"s" * 64)


def _manager(root: Path, **kwargs) -> CheckpointManager:
    return CheckpointManager(root, keep_last=3, log=lambda m: None, **kwargs)


def test_a_checkpoint_in_the_background_is_complete_only_once_written(tmp_path):
    mgr = _manager(tmp_path)
    first = mgr.save(1, _write, {"version": 1, "step": 1})
    go, saved = threading.Event(), []
    state = {"version": 1, "step": 2, "extra": {"k": 1}}
    path = mgr.save_async(2, _stage(b"b" * 64, go=go), state, saved=saved.append)
    state["extra"]["k"] = 2  # training goes on: the saved trainer state is the one of the snapshot
    assert mgr.writing and path.name == "step-2" and not path.exists()
    assert mgr.latest() == first  # no marker before the files are written
    go.set()
    mgr.settle()
    assert not mgr.writing and mgr.latest() == path and saved == [path]
    assert set(verify(path)["files"]) == {"model/shard-0.bin", "model/index.json", "trainer_state.json"}
    assert json.loads((path / "model/index.json").read_text()) == [{"rank": 0, "size": 64}]
    assert read_trainer_state(path)["extra"] == {"k": 1}


def test_the_next_save_waits_for_the_one_in_the_background(tmp_path):
    mgr = _manager(tmp_path)
    go = threading.Event()
    mgr.save_async(1, _stage(b"a" * 64, go=go), {"version": 1, "step": 1})
    after = threading.Thread(target=mgr.save, args=(2, _write, {"version": 1, "step": 2}))
    after.start()
    after.join(0.3)
    assert after.is_alive() and not (tmp_path / ".tmp-step-2").exists()  # held until step 1 is complete
    go.set()
    after.join(30)
    assert [s for s, _ in mgr.complete()] == [1, 2]


@pytest.mark.parametrize("surfaces", ["next_save", "settle"])
def test_a_failed_write_in_the_background_is_raised_later_and_keeps_the_previous_checkpoint(tmp_path, surfaces):
    mgr = _manager(tmp_path)
    good = mgr.save(1, _write, {"version": 1, "step": 1})
    full = OSError(errno.ENOSPC, "No space left on device")
    mgr.save_async(2, _stage(b"b", fail=full), {"version": 1, "step": 2})  # the snapshot itself succeeds
    with pytest.raises(CheckpointWriteError) as error:
        if surfaces == "next_save":
            mgr.save_async(3, _stage(b"c"), {"version": 1, "step": 3})
        else:
            mgr.settle()  # what the end of a stage does before its final checkpoint
    message = str(error.value)
    assert "step-2" in message and "No space left on device" in message and "errno 28" in message
    assert f"{good} is intact" in message and "--resume" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-1"]  # the half-written save is gone
    assert mgr.latest() == good
    mgr.save(4, _write, {"version": 1, "step": 4})  # the failure was raised once; saving goes on
    assert [s for s, _ in mgr.complete()] == [1, 4]


def test_other_errors_in_the_background_are_raised_as_they_are(tmp_path):
    mgr = _manager(tmp_path)
    mgr.save_async(1, _stage(b"a", fail=ValueError("a bug")), {"version": 1, "step": 1})
    with pytest.raises(ValueError, match="a bug"):
        mgr.settle()


def test_a_failing_run_waits_a_bounded_time_and_raises_nothing(tmp_path):
    logs: list[str] = []
    mgr = CheckpointManager(tmp_path, keep_last=1, log=logs.append)
    never = threading.Event()
    mgr.save_async(1, _stage(b"a", go=never), {"version": 1, "step": 1})
    mgr.settle(timeout=0.2)
    assert any("step-1 was not completed in the background" in m for m in logs)
    assert mgr.latest() is None
    never.set()


def _two_ranks(root: Path, stage_of_rank) -> list[BaseException | Path]:
    """Rank 0 and rank 1 as two threads sharing `root`, a barrier and a vote: a save in the background, then settle()."""
    barrier = threading.Barrier(2)
    votes = [False, False]
    out: list[BaseException | Path] = [RuntimeError("did not finish")] * 2

    def rank(r: int) -> None:
        def any_rank(flag: bool) -> bool:
            votes[r] = flag
            barrier.wait()
            vote = any(votes)
            barrier.wait()
            return vote

        mgr = CheckpointManager(root, keep_last=1, rank=r, world_size=2, barrier=barrier.wait, any_rank=any_rank, log=lambda m: None)
        try:
            path = mgr.save_async(1, stage_of_rank(r), {"version": 1, "step": 1})
            mgr.settle()
            out[r] = path
        except BaseException as e:
            out[r] = e

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
        assert not t.is_alive(), "a rank hangs"
    return out


def test_rank_0_marks_the_checkpoint_once_every_rank_wrote_its_part(tmp_path):
    go = threading.Event()
    go.set()
    paths = _two_ranks(tmp_path, lambda r: _stage(bytes([r]) * (10 + r), rank=r, go=go))
    assert paths == [tmp_path / "step-1"] * 2
    files = verify(tmp_path / "step-1")["files"]
    assert set(files) == {"model/shard-0.bin", "model/shard-1.bin", "model/index.json", "trainer_state.json"}  # no part files
    assert json.loads((tmp_path / "step-1/model/index.json").read_text()) == [{"rank": 0, "size": 10}, {"rank": 1, "size": 11}]


def test_one_rank_failing_in_the_background_fails_the_save_on_every_rank_without_a_hang(tmp_path):
    full = OSError(errno.ENOSPC, "No space left on device")
    out = _two_ranks(tmp_path, lambda r: _stage(b"x", rank=r, fail=full if r == 1 else None))
    assert isinstance(out[1], CheckpointWriteError) and "No space left on device" in str(out[1])
    assert isinstance(out[0], CheckpointWriteError) and "it failed on another rank" in str(out[0])
    assert "there is no earlier complete checkpoint" in str(out[0])
    assert list(tmp_path.iterdir()) == []


def test_a_failing_run_does_not_wait_for_a_rank_that_may_be_gone(tmp_path):
    """Rank 0 of two whose partner never writes (lost): the way out of a failed run returns at once."""
    import time

    logs: list[str] = []
    mgr = CheckpointManager(tmp_path, keep_last=1, rank=0, world_size=2, log=logs.append)
    mgr.save_async(1, _stage(b"a"), {"version": 1, "step": 1})
    start = time.monotonic()
    mgr.settle(timeout=30)
    assert time.monotonic() - start < 5
    assert any("step-1 was not completed in the background" in m for m in logs) and mgr.latest() is None
