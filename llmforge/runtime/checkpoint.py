"""Checkpoints that survive a kill at any moment.

A save goes to `.tmp-step-N/`, is fsynced, renamed to `step-N/`, and only then gets its
`COMPLETE` marker, which holds the size and CRC-32 of every file. A reader trusts a
directory only when its marker is there and the checksums match; `load_latest` checks them
in a second thread while the load itself reads the same files, so integrity costs little
wall time. Retention never deletes the newest complete checkpoint, and leftover temp dirs
are removed on the next start.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from llmforge.atomic import atomic_write_text, crc32_file, fsync_dir, fsync_tree, sha256_file
from llmforge.runtime.faults import fault_point
from llmforge.spec.errors import UserError

MARKER = "COMPLETE"
# 2: CRC-32 per file (1: sha256, still read). sha256 ran at ~0.7 GB/s here and was most of a
# tiny checkpoint's load time; a checksum guards against truncation and bit rot, not attackers.
MARKER_VERSION = 2
_CHECKSUMS = {1: ("sha256", sha256_file), 2: ("crc32", crc32_file)}
_HASH_THREADS = 4
T = TypeVar("T")
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


def _checksums(paths: list[Path], checksum: Callable[[Path], str]) -> list[str]:
    # zlib and hashlib release the GIL on large blocks: files hash in parallel.
    if len(paths) <= 1:
        return [checksum(p) for p in paths]
    with ThreadPoolExecutor(min(_HASH_THREADS, len(paths))) as pool:
        return list(pool.map(checksum, paths))


def read_marker(step_dir: Path) -> dict:
    try:
        marker = json.loads((step_dir / MARKER).read_text())
    except (OSError, ValueError) as e:
        raise CorruptCheckpoint(f"{step_dir}: unreadable marker: {e}") from e
    if marker.get("version") not in _CHECKSUMS:
        raise CorruptCheckpoint(f"{step_dir}: marker version {marker.get('version')} is not one this llmforge reads ({', '.join(map(str, _CHECKSUMS))})")
    return marker


def verify(step_dir: Path) -> dict:
    """Check the marker's sizes and checksums; return the marker. Raises CorruptCheckpoint."""
    marker = read_marker(step_dir)
    key, checksum = _CHECKSUMS[marker["version"]]
    for rel, meta in marker["files"].items():
        path = step_dir / rel
        if not path.exists():
            raise CorruptCheckpoint(f"{step_dir}: {rel} is missing")
        if path.stat().st_size != meta["size"]:
            raise CorruptCheckpoint(f"{step_dir}: {rel} has {path.stat().st_size} bytes, the marker says {meta['size']}")
    rels = list(marker["files"])
    for rel, digest in zip(rels, _checksums([step_dir / r for r in rels], checksum), strict=True):
        if digest != marker["files"][rel][key]:
            raise CorruptCheckpoint(f"{step_dir}: {rel} fails its {key} checksum")
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
        self._deleting: threading.Thread | None = None

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

    def _corrupt(self, error: CorruptCheckpoint) -> None:
        if self.on_corrupt == "stop":
            raise UserError(f"corrupt checkpoint: {error}", "restore the file, delete the checkpoint to fall back, or set checkpoint.on_corrupt: fallback") from error
        self.log(f"warning: corrupt checkpoint skipped ({error}); falling back to an earlier one")

    def latest(self) -> Path | None:
        """The newest complete checkpoint whose checksums match, per `on_corrupt`."""
        for _, path in reversed(self.complete()):
            try:
                verify(path)
                return path
            except CorruptCheckpoint as e:
                self._corrupt(e)
        return None

    def load_latest(self, load: Callable[[Path], T], *, overlap: bool = True) -> tuple[Path, T] | None:
        """`load(path)` the newest complete checkpoint whose checksums match, per `on_corrupt`.

        With `overlap`, the checksums are checked in a second thread while `load` reads the
        same files (one pass over the disk, two cores); a corrupt checkpoint's load is then
        discarded and the next older one is loaded over it, so `load` must replace all the
        state it touches. Multi-process loads pass overlap=False: a load that fails on one
        rank's corrupt file mid-collective would leave the other ranks waiting, so every rank
        verifies first, as `latest()` does.
        """
        if not overlap:
            path = self.latest()
            return None if path is None else (path, load(path))
        for _, path in reversed(self.complete()):
            with ThreadPoolExecutor(1) as pool:
                checked = pool.submit(verify, path)
                failure: BaseException | None = None
                try:
                    value = load(path)
                except (KeyboardInterrupt, SystemExit):
                    raise
                except BaseException as e:  # torch's CheckpointException is a BaseException
                    failure = e
                try:
                    checked.result()
                except CorruptCheckpoint as e:
                    # A corrupt file can make the load itself fail: report the corruption, not the symptom.
                    self._corrupt(e)
                    continue
            if failure is not None:
                raise failure
            return path, value
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
                # A plain write: nothing in tmp is visible until the rename, after fsync_tree.
                (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2) + "\n")
                paths = _files(tmp)
                key, checksum = _CHECKSUMS[MARKER_VERSION]
                with ThreadPoolExecutor(1) as pool:  # hash the page-cached files while fsync waits on the disk
                    hashed = pool.submit(_checksums, paths, checksum)
                    fsync_tree(tmp)
                    digests = hashed.result()
                files = {str(p.relative_to(tmp)): {"size": p.stat().st_size, key: digest} for p, digest in zip(paths, digests, strict=True)}
                fault_point("ckpt_before_rename")
                if final.exists():  # an incomplete dir of the same step from a killed run
                    shutil.rmtree(final)
                os.rename(tmp, final)
                fsync_dir(self.root)
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
        """Retire checkpoints beyond `keep_last`: renamed away now, deleted in the background.

        The rename takes them out of `step_dirs()` at once; deleting a 1 GB checkpoint took
        0.3 s, which training need not wait for. The thread is not a daemon, so the process
        finishes the deletion before it exits; after a kill, `cleanup_temp` removes the rest.
        """
        complete = self.complete()
        keep = {s for s, _ in complete[-self.keep_last:]}
        newest = complete[-1][0] if complete else None
        retired = []
        for step, path in self.step_dirs():
            if step in keep or step == newest:
                continue
            if (path / MARKER).exists() or (newest is not None and step < newest):
                trash = path.with_name(f".tmp-retired-{path.name}")
                shutil.rmtree(trash, ignore_errors=True)
                os.rename(path, trash)
                retired.append(trash)
        self.wait()
        if retired:
            self._deleting = threading.Thread(target=lambda: [shutil.rmtree(p, ignore_errors=True) for p in retired],
                                              name="llmforge-checkpoint-retention")
            self._deleting.start()

    def wait(self) -> None:
        """Wait for the background deletion of retired checkpoints."""
        if self._deleting is not None:
            self._deleting.join()
            self._deleting = None


def read_trainer_state(step_dir: Path) -> dict:
    state = json.loads((step_dir / "trainer_state.json").read_text())
    if state.get("version") != 1:
        raise UserError(f"{step_dir}/trainer_state.json has version {state.get('version')}; this llmforge reads 1")
    return state
