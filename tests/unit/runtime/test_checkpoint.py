"""Checkpoint atomicity: only complete, checksum-valid checkpoints are ever chosen."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llmforge.runtime.checkpoint import MARKER, CheckpointManager, verify
from llmforge.spec.errors import UserError


def _write(payload: bytes):
    def write(tmp: Path) -> None:
        (tmp / "model").mkdir()
        (tmp / "model" / "shard-0.bin").write_bytes(payload)
        (tmp / "model" / "shard-1.bin").write_bytes(payload[::-1])

    return write


def test_save_publishes_marker_with_checksums(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=2, log=lambda m: None)
    path = mgr.save(10, _write(b"abc" * 100), {"version": 1, "step": 10})
    marker = verify(path)
    assert path.name == "step-10" and marker["step"] == 10
    assert set(marker["files"]) == {"model/shard-0.bin", "model/shard-1.bin", "trainer_state.json"}
    assert mgr.latest() == path
    assert not any(p.name.startswith(".tmp") for p in tmp_path.iterdir())


def test_retention_keeps_newest_complete(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=1, log=lambda m: None)
    for step in (1, 2, 3):
        mgr.save(step, _write(bytes([step]) * 10), {"version": 1, "step": step})
    assert [s for s, _ in mgr.step_dirs()] == [3]  # retired at once, deleted in the background
    mgr.wait()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-3"]
    (tmp_path / ".tmp-retired-step-2").mkdir()  # a deletion a kill interrupted
    mgr.cleanup_temp()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-3"]


def test_incomplete_and_temp_dirs_are_ignored_and_cleaned(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=3, log=lambda m: None)
    good = mgr.save(5, _write(b"x" * 50), {"version": 1, "step": 5})
    (tmp_path / "step-9").mkdir()  # renamed but killed before its marker
    (tmp_path / ".tmp-step-12").mkdir()  # killed mid-write
    assert mgr.latest() == good
    mgr.cleanup_temp()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-5"]


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupt_checkpoint_falls_back_or_stops(tmp_path, damage):
    logs: list[str] = []
    mgr = CheckpointManager(tmp_path, keep_last=3, log=logs.append)
    older = mgr.save(1, _write(b"a" * 64), {"version": 1, "step": 1})
    newer = mgr.save(2, _write(b"b" * 64), {"version": 1, "step": 2})
    shard = newer / "model" / "shard-0.bin"
    data = bytearray(shard.read_bytes())
    if damage == "truncate":
        shard.write_bytes(bytes(data[:10]))
    else:
        data[5] ^= 0xFF
        shard.write_bytes(bytes(data))
    assert mgr.latest() == older
    assert any("corrupt checkpoint skipped" in m and "shard-0.bin" in m for m in logs)
    stop = CheckpointManager(tmp_path, keep_last=3, on_corrupt="stop", log=logs.append)
    with pytest.raises(UserError, match="shard-0.bin"):
        stop.latest()


KILL_SCRIPT = """
import os, sys
from pathlib import Path
from llmforge.runtime.checkpoint import CheckpointManager
root = Path(sys.argv[1])
mgr = CheckpointManager(root, keep_last=1, log=lambda m: None)
def write(tmp):
    (tmp / "w.bin").write_bytes(os.urandom(4096))
for step in (1, 2):
    mgr.save(step, write, {"version": 1, "step": step})
"""


@pytest.mark.parametrize("point", ["ckpt_after_shard", "ckpt_before_rename", "ckpt_before_marker"])
def test_sigkill_inside_save_leaves_previous_checkpoint(tmp_path, point):
    env = {**os.environ, "LLMFORGE_FAULT": f"{point}@2"}  # die during the second save
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(tmp_path)], env=env, capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()
    mgr = CheckpointManager(tmp_path, keep_last=1, log=lambda m: None)
    latest = mgr.latest()
    assert latest is not None and latest.name == "step-1"
    assert json.loads((latest / MARKER).read_text())["step"] == 1
    mgr.cleanup_temp()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-1"]


def _damaged_pair(tmp_path: Path, logs: list[str]) -> tuple[CheckpointManager, Path, Path]:
    mgr = CheckpointManager(tmp_path, keep_last=3, log=logs.append)
    older = mgr.save(1, _write(b"a" * 4096), {"version": 1, "step": 1})
    newer = mgr.save(2, _write(b"b" * 4096), {"version": 1, "step": 2})
    shard = newer / "model" / "shard-1.bin"
    data = bytearray(shard.read_bytes())
    data[100] ^= 0x01  # one bit: same size, only the checksum can tell
    shard.write_bytes(bytes(data))
    return mgr, older, newer


@pytest.mark.parametrize("overlap", [True, False])
def test_load_latest_discards_a_corrupt_load_and_loads_the_older_one(tmp_path, overlap):
    logs: list[str] = []
    mgr, older, newer = _damaged_pair(tmp_path, logs)
    loaded: list[Path] = []

    def load(path: Path) -> bytes:
        loaded.append(path)
        return (path / "model" / "shard-0.bin").read_bytes()

    path, value = mgr.load_latest(load, overlap=overlap)
    assert path == older and value == b"a" * 4096
    # Overlapped, the newer one is read (and its load discarded); verified first, it never is.
    assert loaded == ([newer, older] if overlap else [older])
    assert any("xxh3_64 checksum" in m and "shard-1.bin" in m for m in logs)
    stop = CheckpointManager(tmp_path, keep_last=3, on_corrupt="stop", log=logs.append)
    with pytest.raises(UserError, match="shard-1.bin"):
        stop.load_latest(load, overlap=overlap)


def test_load_latest_reports_corruption_not_the_load_error_it_caused(tmp_path):
    logs: list[str] = []
    mgr, older, newer = _damaged_pair(tmp_path, logs)

    def load(path: Path) -> str:
        if path == newer:
            raise RuntimeError("unpickling failed")  # what a torn file does to torch.load
        return path.name

    assert mgr.load_latest(load) == (older, "step-1")
    assert any("corrupt checkpoint skipped" in m for m in logs)
    # A load that fails on an intact checkpoint is a real error: raised, not skipped.
    def always_fails(path: Path) -> None:
        raise RuntimeError("bad spec")

    with pytest.raises(RuntimeError, match="bad spec"):
        mgr.load_latest(always_fails)
    assert CheckpointManager(tmp_path / "empty", keep_last=1).load_latest(always_fails) is None


@pytest.mark.parametrize("version", [1, 2])
def test_markers_of_earlier_versions_still_verify(tmp_path, version):
    import hashlib
    import zlib

    mgr = CheckpointManager(tmp_path, keep_last=1, log=lambda m: None)
    path = mgr.save(1, _write(b"z" * 100), {"version": 1, "step": 1})
    marker = json.loads((path / MARKER).read_text())
    assert marker["version"] == 3 and all(len(meta["xxh3_64"]) == 16 for meta in marker["files"].values())
    key, digest = {1: ("sha256", lambda data: hashlib.sha256(data).hexdigest()), 2: ("crc32", lambda data: f"{zlib.crc32(data):08x}")}[version]
    files = {rel: {"size": meta["size"], key: digest((path / rel).read_bytes())} for rel, meta in marker["files"].items()}
    (path / MARKER).write_text(json.dumps({"version": version, "step": 1, "files": files}))
    assert verify(path)["version"] == version and mgr.latest() == path
    files["trainer_state.json"][key] = "0" * len(files["trainer_state.json"][key])
    (path / MARKER).write_text(json.dumps({"version": version, "step": 1, "files": files}))
    assert mgr.latest() is None
