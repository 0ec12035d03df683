"""Checkpoints that survive a kill at any moment.

A save goes to `.tmp-step-N/`, is fsynced, renamed to `step-N/`, and only then gets its
`COMPLETE` marker, which holds the size and XXH3-64 checksum of every file. A reader trusts a
directory only when its marker is there and the checksums match; `load_latest` checks them
in a second thread while the load itself reads the same files, so integrity costs little
wall time. Retention never deletes the newest complete checkpoint, and leftover temp dirs
are removed on the next start.

`save_async` takes the step's snapshot on the calling (training) thread and writes in a
background thread (see `save_async` for why a thread); the marker still comes last, so a
kill during the write leaves the previous checkpoint the newest complete one.
"""

from __future__ import annotations

import functools
import json
import os
import pickle
import re
import shutil
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol, TypeVar

from llmforge.atomic import atomic_write_bytes, atomic_write_text, crc32_file, fsync_dir, fsync_tree, sha256_file, xxh3_file
from llmforge.runtime.faults import fault_point
from llmforge.spec.errors import UserError

MARKER = "COMPLETE"
# 3: XXH3-64 per file (2: CRC-32, 1: sha256, both still read). sha256 ran at ~0.7 GB/s here,
# CRC-32 at 1-3 GB/s, and each in turn was the larger part of a tiny checkpoint's load; XXH3
# runs at ~20 GB/s. A checksum guards against truncation and bit rot, not attackers.
MARKER_VERSION = 3
_CHECKSUMS = {1: ("sha256", sha256_file), 2: ("crc32", crc32_file), 3: ("xxh3_64", xxh3_file)}
_HASH_THREADS = 4
T = TypeVar("T")
_STEP_DIR = re.compile(r"^step-(\d+)$")


class CorruptCheckpoint(Exception):
    """A checkpoint whose files do not match the checksums in its marker."""


class CheckpointWriteError(Exception):
    """A save failed on an OS error (disk full, quota, permissions); the previous checkpoint stands: exit 1."""


class StagedCheckpoint(Protocol):
    """What `save_async`'s `stage(tmp)` returns: the step's state, fixed, with the files still to write."""

    def write(self) -> Any:
        """Write this rank's files (any thread, no collective); return what rank 0's `finish` needs (picklable)."""

    def finish(self, parts: list[Any]) -> None:
        """Rank 0, once every rank's `write` is done: what completes the files (e.g. metadata); `parts` by rank."""


class _Pending:
    """A save in the background: its thread, and what it left for the next save to check."""

    def __init__(self, step: int, tmp: Path, final: Path) -> None:
        self.step, self.tmp, self.final = step, tmp, final
        self.written = threading.Event()  # this rank's files are written (or failed)
        self.cancel = threading.Event()  # rank 0 stops waiting for the other ranks' parts
        self.error: BaseException | None = None
        self.thread: threading.Thread | None = None


class _Cancelled(Exception):
    """Rank 0 gave up waiting for another rank's part (that rank's write failed)."""


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
    # Files are read in parallel (reads release the GIL; XXH3 holds it ~0.4 ms per 8 MB block).
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
                 barrier: Callable[[], None] = lambda: None, log: Callable[[str], None] = print,
                 world_size: int = 1, any_rank: Callable[[bool], bool] = bool):
        self.root = Path(root)
        self.keep_last = keep_last
        self.on_corrupt = on_corrupt
        self.rank = rank
        self.barrier = barrier
        self.log = log
        self.world_size = world_size
        self.any_rank = any_rank  # a collective: whether any rank's flag is set
        self._deleting: threading.Thread | None = None
        self._pending: _Pending | None = None

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
        """Write a checkpoint for `step`: `write(tmp_dir)` is called on every rank (collective).

        A save still in the background is finished first, and its failure raised.
        """
        self.settle()
        final, tmp = self._start(step)
        try:
            write(tmp)
            fault_point("ckpt_after_shard")
            self.barrier()
            if self.rank == 0:
                self._publish(step, tmp, final, json.dumps(trainer_state, indent=2) + "\n")
        except BaseException as e:
            self._raise_write_error(step, tmp, final, e)
        self.barrier()
        return final

    def save_async(self, step: int, stage: Callable[[Path], StagedCheckpoint], trainer_state: dict[str, Any],
                   saved: Callable[[Path], None] | None = None) -> Path:
        """Snapshot `step` now and write it in a background thread; returns the path it will have.

        `stage(tmp_dir)` runs on every rank (a collective): it copies the state (`sharded_io.deferred_writes`)
        and may write small files itself. The write then needs no collective, so it runs in a
        thread of this process: a process would have to be forked from one holding gloo/NCCL
        threads or be handed the snapshot through shared memory, and the write is mostly the
        kernel's copy into the page cache, which runs without the GIL (docs/performance.md has the
        slowdown of steps during a write). Each rank then leaves its part in a file; rank 0 waits
        for all of them, finishes, fsyncs, renames and writes the marker (`saved(path)` is called
        then). The next `save`/`save_async`, or `settle()`, waits for it and raises its failure,
        as `save` would have; until the marker, the previous complete checkpoint is the newest.
        """
        self.settle()
        final, tmp = self._start(step)
        try:
            staged = stage(tmp)
        except BaseException as e:
            self._raise_write_error(step, tmp, final, e)
        pending = _Pending(step, tmp, final)
        text = json.dumps(trainer_state, indent=2) + "\n"  # now: the dict may change while the thread runs
        pending.thread = threading.Thread(target=self._write_in_background, args=(pending, staged, text, saved),
                                          name="llmforge-checkpoint-writer", daemon=True)
        self._pending = pending
        pending.thread.start()
        return final

    def _write_in_background(self, pending: _Pending, staged: StagedCheckpoint, text: str, saved) -> None:
        try:
            try:
                part = staged.write()
                fault_point("ckpt_after_shard")
                if self.rank > 0:  # for rank 0, which finishes: a file, so that no collective runs in this thread
                    atomic_write_bytes(pending.tmp / _part_name(self.rank), pickle.dumps(part))
            finally:
                pending.written.set()
            if self.rank == 0:
                staged.finish([part] + [self._part(pending, rank) for rank in range(1, self.world_size)])
                self._publish(pending.step, pending.tmp, pending.final, text, background=True)
                if saved is not None:
                    saved(pending.final)
        except BaseException as e:  # raised on the training thread by settle()
            pending.error = e

    def _part(self, pending: _Pending, rank: int) -> Any:
        """Another rank's part, once it is there; removed, so that it is not part of the checkpoint."""
        path = pending.tmp / _part_name(rank)
        while not path.exists():
            if pending.cancel.wait(0.005):
                raise _Cancelled(f"rank {rank} wrote no part")
        part = pickle.loads(path.read_bytes())
        path.unlink()
        return part

    @property
    def writing(self) -> bool:
        """Whether a save's files are still being written in the background."""
        return self._pending is not None and self._pending.thread.is_alive()

    def settle(self, *, timeout: float | None = None) -> None:
        """Wait for the save in the background, if any; raise its failure as `save` would (a collective).

        With `timeout` (the way out of a failed run): no collective and no error, only a bounded
        wait, so that a save that can finish does. Rank 0 of several waits for no part that is
        not there yet: the other ranks may be gone (a lost rank), and an unmarked save is never trusted.
        """
        pending, self._pending = self._pending, None
        if pending is None:
            return
        if timeout is not None:
            pending.written.wait(timeout)
            if self.rank == 0 and not all((pending.tmp / _part_name(rank)).exists() for rank in range(1, self.world_size)):
                pending.cancel.set()
            pending.thread.join(timeout)
            if pending.thread.is_alive() or pending.error is not None:
                why = ("still writing" if pending.thread.is_alive() else "a part of another rank was missing"
                       if isinstance(pending.error, _Cancelled) else f"{type(pending.error).__name__}: {pending.error}")
                self.log(f"warning: checkpoint {pending.final.name} was not completed in the background ({why}); "
                         "the previous complete checkpoint stands")
            return
        pending.written.wait()
        failed = pending.error is not None
        if self.world_size > 1 and self.any_rank(failed) and not failed:
            pending.cancel.set()  # rank 0 would wait for the failed rank's part forever
        pending.thread.join()
        failed = pending.error is not None
        if self.world_size > 1:
            failed = self.any_rank(failed)  # rank 0's finish and marker count for every rank
        if failed:
            self._raise_write_error(pending.step, pending.tmp, pending.final, pending.error)

    def _start(self, step: int) -> tuple[Path, Path]:
        final = self.root / f"step-{step}"
        tmp = self.root / f".tmp-step-{step}"
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        self.barrier()
        return final, tmp

    def _publish(self, step: int, tmp: Path, final: Path, trainer_state: str, *, background: bool = False) -> None:
        """Rank 0, every rank's files written: trainer state, fsync and checksums, rename, marker, retention."""
        # A plain write: nothing in tmp is visible until the rename, after fsync_tree.
        (tmp / "trainer_state.json").write_text(trainer_state)
        paths = _files(tmp)
        key, checksum = _CHECKSUMS[MARKER_VERSION]
        if background:  # read, not mapped: the training thread keeps the GIL (atomic.xxh3_file)
            checksum = functools.partial(checksum, mapped=False)
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

    def _raise_write_error(self, step: int, tmp: Path, final: Path, error: BaseException | None) -> None:
        """Raise what a failed save raises: CheckpointWriteError for an OS error (its space freed), else the error itself.

        `error` is None (or `_Cancelled`) on a rank whose own part was written when another rank's failed.
        """
        mine = error is not None and not isinstance(error, _Cancelled)
        cause = _os_error(error) if mine else None
        if mine and cause is None:
            raise error
        if self.rank == 0:  # free what the failed save took; an unmarked dir is never trusted anyway
            shutil.rmtree(tmp, ignore_errors=True)
            if not (final / MARKER).exists():
                shutil.rmtree(final, ignore_errors=True)
        previous = self.complete()
        kept = f"the previous complete checkpoint {previous[-1][1]} is intact" if previous else "there is no earlier complete checkpoint"
        why = (f"{cause.strerror or cause} ({type(cause).__name__}, errno {cause.errno})" if cause is not None
               else "it failed on another rank (that rank's output says why)")
        raise CheckpointWriteError(f"checkpoint step-{step} could not be written to {self.root}: {why}; {kept}. "
                                   "Free space (or fix the directory), then continue with --resume") from error

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


def _part_name(rank: int) -> str:
    return f".part-rank-{rank:05d}.pkl"


def read_trainer_state(step_dir: Path) -> dict:
    state = json.loads((step_dir / "trainer_state.json").read_text())
    if state.get("version") != 1:
        raise UserError(f"{step_dir}/trainer_state.json has version {state.get('version')}; this llmforge reads 1")
    return state
