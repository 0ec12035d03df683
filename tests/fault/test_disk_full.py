"""Disk full during a save (promise 14): the previous checkpoint stays intact and the error says so."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from llmforge.runtime.checkpoint import CheckpointManager, CheckpointWriteError, verify
from tests.fault.harness import assert_same_weights, losses, steps_saved


def _write(tmp: Path) -> None:
    (tmp / "model").mkdir()
    (tmp / "model" / "__0_0.distcp").write_bytes(b"w" * 4096)


def _full(tmp: Path) -> None:
    (tmp / "model").mkdir()
    (tmp / "model" / "__0_0.distcp").write_bytes(b"w" * 100)
    raise OSError(errno.ENOSPC, "No space left on device")


class Wrapped(BaseException):
    """Like torch's CheckpointException: a BaseException carrying each rank's failure."""

    def __init__(self, error: BaseException):
        super().__init__("CheckpointException ranks:dict_keys([0])")
        self.failures = {0: (error, None)}


def _wrapped(tmp: Path) -> None:
    try:
        _full(tmp)
    except OSError as e:
        raise Wrapped(e) from None


@pytest.mark.parametrize("write", [_full, _wrapped])
def test_a_full_disk_keeps_the_previous_checkpoint_and_says_so(tmp_path, write):
    mgr = CheckpointManager(tmp_path, keep_last=1, log=lambda m: None)
    good = mgr.save(10, _write, {"version": 1, "step": 10})
    with pytest.raises(CheckpointWriteError) as error:
        mgr.save(20, write, {"version": 1, "step": 20})
    message = str(error.value)
    assert "step-20" in message and "No space left on device" in message and "errno 28" in message
    assert f"{good} is intact" in message and "--resume" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-10"]  # the half-written save is gone, freeing its space
    assert mgr.latest() == good and verify(good)["step"] == 10


def test_a_full_disk_at_the_marker_leaves_no_untrusted_dir(tmp_path, monkeypatch):
    import llmforge.runtime.checkpoint as checkpoint

    mgr = CheckpointManager(tmp_path, keep_last=1, log=lambda m: None)
    good = mgr.save(10, _write, {"version": 1, "step": 10})
    real = checkpoint.atomic_write_text

    def full_at_marker(path, text):
        if Path(path).name == checkpoint.MARKER:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, text)

    monkeypatch.setattr(checkpoint, "atomic_write_text", full_at_marker)
    with pytest.raises(CheckpointWriteError, match="step-20"):
        mgr.save(20, _write, {"version": 1, "step": 20})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-10"] and mgr.latest() == good


def test_other_errors_are_not_disguised_as_a_full_disk(tmp_path):
    def broken(tmp: Path) -> None:
        raise ValueError("a bug")

    with pytest.raises(ValueError, match="a bug"):
        CheckpointManager(tmp_path, keep_last=1, log=lambda m: None).save(1, broken, {"version": 1, "step": 1})


# Every write into the save of step 20 fails as a full disk does: the file is created, no byte lands.
FULL_AT_20 = """
import builtins, errno, io
real_open = io.open
class Full:
    def __init__(self, f):
        self._f = f
    def write(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")
    def __getattr__(self, name):
        return getattr(self._f, name)
    def __enter__(self):
        return self
    def __exit__(self, *exc):
        self._f.close()
def patched(file, mode="r", *args, **kwargs):
    f = real_open(file, mode, *args, **kwargs)
    return Full(f) if ".tmp-step-20" in str(file) and any(c in mode for c in "wax+") else f
builtins.open = io.open = patched
"""


@pytest.mark.slow
def test_a_run_whose_disk_fills_during_a_save_stops_cleanly_and_resumes(llmforge, reference, tmp_path):
    run = tmp_path / "run"
    full = llmforge("--run-dir", str(run), prelude=FULL_AT_20)
    assert full.returncode == 1, full.output[-4000:]
    assert "error: checkpoint step-20 could not be written" in full.stderr and "No space left on device" in full.stderr
    assert "step-10 is intact" in full.stderr and "Traceback" not in full.stderr
    assert sorted(p.name for p in (run / "checkpoints/pretrain").iterdir()) == ["step-10"]

    resumed = llmforge("--run-dir", str(run), "--resume")
    assert resumed.returncode == 0, resumed.output[-4000:]
    assert "step-10 at step 10" in resumed.stdout
    assert steps_saved(run) == [30, 40]
    assert losses(run) == losses(reference)
    assert_same_weights(run / "checkpoints/pretrain/step-40", reference / "checkpoints/pretrain/step-40")
