"""Checkpoints that survive a kill at any moment.

A save goes to `.tmp-step-N/`, is fsynced, renamed to `step-N/`, and only then gets its
`COMPLETE` marker, which holds the checksum of every file. A reader trusts a directory
only when its marker is there and the checksums match. Retention never deletes the
newest complete checkpoint, and leftover temp dirs are removed on the next start.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llmforge.atomic import atomic_write_text, fsync_dir, fsync_tree, sha256_file
from llmforge.runtime.faults import fault_point
from llmforge.spec.errors import UserError

MARKER = "COMPLETE"
MARKER_VERSION = 1
_STEP_DIR = re.compile(r"^step-(\d+)$")


class CorruptCheckpoint(Exception):
    """A checkpoint whose files do not match the checksums in its marker."""


class CheckpointWriteError(Exception):
    """A save failed on an OS error (disk full, quota, permissions); the previous checkpoint stands: exit 1."""


def _os_error(error: BaseException) -> OSError | None:
    """The OSError behind `error`, through exception chains and torch's per-rank CheckpointException."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [error]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError):
            return e
        failures = getattr(e, "failures", None)  # torch.distributed.checkpoint: {rank: (exception, traceback)}
        if isinstance(failures, dict):
            todo += [f[0] if isinstance(f, tuple) else f for f in failures.values()]
        todo += [e.__cause__, e.__context__]
    return None


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != MARKER)


def verify(step_dir: Path) -> dict:
    """Check the marker's checksums; return the marker. Raises CorruptCheckpoint."""
    marker_path = step_dir / MARKER
    try:
        marker = json.loads(marker_path.read_text())
    except (OSError, ValueError) as e:
        raise CorruptCheckpoint(f"{step_dir}: unreadable marker: {e}") from e
    if marker.get("version") != MARKER_VERSION:
        raise CorruptCheckpoint(f"{step_dir}: marker version {marker.get('version')} is not {MARKER_VERSION}")
    for rel, meta in marker["files"].items():
        path = step_dir / rel
        if not path.exists():
            raise CorruptCheckpoint(f"{step_dir}: {rel} is missing")
        if path.stat().st_size != meta["size"]:
            raise CorruptCheckpoint(f"{step_dir}: {rel} has {path.stat().st_size} bytes, the marker says {meta['size']}")
        if sha256_file(path) != meta["sha256"]:
            raise CorruptCheckpoint(f"{step_dir}: {rel} fails its sha256 checksum")
    return marker


class CheckpointManager:
    """Save, find and prune the checkpoints of one stage.

    Args:
        barrier: a collective barrier (no-op on one process); rank 0 does the file moves.
    """

    def __init__(self, root: Path, *, keep_last: int, on_corrupt: str = "fallback", rank: int = 0,
                 barrier: Callable[[], None] = lambda: None, log: Callable[[str], None] = print):
        self.root = Path(root)
        self.keep_last = keep_last
        self.on_corrupt = on_corrupt
        self.rank = rank
        self.barrier = barrier
        self.log = log

    def step_dirs(self) -> list[tuple[int, Path]]:
        if not self.root.exists():
            return []
        out = [(int(m.group(1)), p) for p in self.root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
        return sorted(out)

    def complete(self) -> list[tuple[int, Path]]:
        return [(s, p) for s, p in self.step_dirs() if (p / MARKER).exists()]

    def cleanup_temp(self) -> None:
        """Remove half-written saves left by a killed run (rank 0, at start)."""
        if self.rank != 0 or not self.root.exists():
            return
        for p in self.root.iterdir():
            if p.name.startswith(".tmp-") or (_STEP_DIR.match(p.name) and not (p / MARKER).exists()):
                shutil.rmtree(p, ignore_errors=True)
                self.log(f"removed incomplete checkpoint {p}")

    def latest(self) -> Path | None:
        """The newest complete checkpoint whose checksums match, per `on_corrupt`."""
        for step, path in reversed(self.complete()):
            try:
                verify(path)
                return path
            except CorruptCheckpoint as e:
                if self.on_corrupt == "stop":
                    raise UserError(f"corrupt checkpoint: {e}", "restore the file, delete the checkpoint to fall back, or set checkpoint.on_corrupt: fallback") from e
                self.log(f"warning: corrupt checkpoint skipped ({e}); falling back to an earlier one")
        return None

    def save(self, step: int, write: Callable[[Path], None], trainer_state: dict[str, Any]) -> Path:
        """Write a checkpoint for `step`: `write(tmp_dir)` is called on every rank (collective)."""
        final = self.root / f"step-{step}"
        tmp = self.root / f".tmp-step-{step}"
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        self.barrier()
        try:
            write(tmp)
            fault_point("ckpt_after_shard")
            self.barrier()
            if self.rank == 0:
                atomic_write_text(tmp / "trainer_state.json", json.dumps(trainer_state, indent=2) + "\n")
                fsync_tree(tmp)
                fault_point("ckpt_before_rename")
                if final.exists():  # an incomplete dir of the same step from a killed run
                    shutil.rmtree(final)
                os.rename(tmp, final)
                fsync_dir(self.root)
                files = {str(p.relative_to(final)): {"size": p.stat().st_size, "sha256": sha256_file(p)} for p in _files(final)}
                fault_point("ckpt_before_marker")
                atomic_write_text(final / MARKER, json.dumps({"version": MARKER_VERSION, "step": step, "files": files}, indent=1) + "\n")
                self._prune()
        except BaseException as e:
            cause = _os_error(e)
            if cause is None:
                raise
            if self.rank == 0:  # free what the failed save took; an unmarked dir is never trusted anyway
                shutil.rmtree(tmp, ignore_errors=True)
                if not (final / MARKER).exists():
                    shutil.rmtree(final, ignore_errors=True)
            previous = self.complete()
            kept = f"the previous complete checkpoint {previous[-1][1]} is intact" if previous else "there is no earlier complete checkpoint"
            raise CheckpointWriteError(
                f"checkpoint step-{step} could not be written to {self.root}: {cause.strerror or cause} "
                f"({type(cause).__name__}, errno {cause.errno}); {kept}. Free space (or fix the directory), then continue with --resume"
            ) from e
        self.barrier()
        return final

    def _prune(self) -> None:
        complete = self.complete()
        keep = {s for s, _ in complete[-self.keep_last:]}
        newest = complete[-1][0] if complete else None
        for step, path in self.step_dirs():
            if step in keep or step == newest:
                continue
            if (path / MARKER).exists() or (newest is not None and step < newest):
                shutil.rmtree(path, ignore_errors=True)


def read_trainer_state(step_dir: Path) -> dict:
    state = json.loads((step_dir / "trainer_state.json").read_text())
    if state.get("version") != 1:
        raise UserError(f"{step_dir}/trainer_state.json has version {state.get('version')}; this llmforge reads 1")
    return state
