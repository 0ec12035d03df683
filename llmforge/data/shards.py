"""WebDataset token shards: plain tar files of `<key>.tokens.npy` members.

We write the tar headers ourselves so that the offset of every member is known as it is
written; the manifest records them, and the loader reads any sample with one `pread`.
Shards are byte-identical for identical inputs (mtime 0, fixed order), so checksums are
stable across re-runs.
"""

from __future__ import annotations

import ast
import hashlib
import io
import json
import os
import tarfile
from collections.abc import Iterable, Iterator
from functools import lru_cache
from pathlib import Path

import numpy as np

from llmforge.atomic import fsync_dir
from llmforge.data.errors import ErrorPolicy

BLOCK = 512
RECORD = 20 * BLOCK  # tar's record size; GNU tar and Python's tarfile pad archives to it
MEMBER_SUFFIX = ".tokens.npy"


def sample_key(index: int) -> str:
    """The `__key__` of sample `index` of a split (its position in the split, zero-padded)."""
    return f"{index:010d}"


@lru_cache(maxsize=4096)
def _tar_template(name_length: int, size: int) -> tuple[bytes, int]:
    """A USTAR header for a member of `size` bytes, and its checksum without the name's bytes.

    `TarInfo.tobuf` costs ~60 µs, as much as everything else per sample, so we build one
    header per (name length, size) and patch in the name and checksum.
    """
    info = tarfile.TarInfo("\0" * name_length)
    info.size, info.mtime, info.mode = size, 0, 0o644
    header = info.tobuf(format=tarfile.USTAR_FORMAT)
    return header, sum(header[:148]) + sum(header[156:]) + 8 * ord(" ")  # the checksum field counts as spaces


def tar_header(name: str, size: int) -> bytes:
    encoded = name.encode()
    header, base = _tar_template(len(encoded), size)
    checksum = base + sum(encoded)
    return encoded + header[len(encoded) : 148] + b"%06o\0 " % checksum + header[156:]


@lru_cache(maxsize=4096)
def _npy_header(dtype: str, length: int) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": np.dtype(dtype).str, "fortran_order": False, "shape": (length,)})
    return buf.getvalue()


@lru_cache(maxsize=256)
def _parse_npy_header(header: bytes) -> tuple[np.dtype, int]:
    meta = ast.literal_eval(header.decode("latin1"))
    shape = meta["shape"]
    if meta.get("fortran_order") or len(shape) != 1:
        raise ValueError(f"expected a 1-D array, got shape {shape}")
    return np.dtype(meta["descr"]), int(shape[0])


def decode_npy(buf: bytes) -> np.ndarray:
    """A 1-D array from .npy bytes; ValueError when they are not one (no pickles, ever)."""
    if buf[:6] != b"\x93NUMPY" or len(buf) < 10:
        raise ValueError("not a .npy array (bad magic)")
    if buf[6] == 1:
        start, hlen = 10, int.from_bytes(buf[8:10], "little")
    else:
        start, hlen = 12, int.from_bytes(buf[8:12], "little")
    try:
        dtype, length = _parse_npy_header(bytes(buf[start : start + hlen]))
    except (ValueError, SyntaxError, KeyError, TypeError) as e:
        raise ValueError(f"bad .npy header: {e}") from None
    if dtype.kind not in "ui":
        raise ValueError(f"token ids must be integers, got dtype {dtype}")
    data = start + hlen
    if len(buf) - data != length * dtype.itemsize:
        raise ValueError(f".npy holds {len(buf) - data} bytes, header says {length} × {dtype.itemsize}")
    return np.frombuffer(buf, dtype=dtype, offset=data)


class ShardWriter:
    """Write samples into `<split_dir>/shard-NNNNNN.tar` files of about `target_bytes` each.

    Each shard is written to a hidden temporary file, fsynced and renamed into place, so a
    killed writer leaves no file under a shard name that a half-written shard could take.
    """

    def __init__(self, data_dir: Path, split: str, *, target_bytes: int, dtype: np.dtype) -> None:
        self.data_dir, self.split = data_dir, split
        self.split_dir = data_dir / split
        self.split_dir.mkdir(parents=True, exist_ok=True)
        self.target_bytes, self.dtype = target_bytes, np.dtype(dtype)
        self.records: list[dict] = []
        self.index = 0  # next sample index in the split
        self.max_id = -1  # the largest token id written; the loader checks it against the model's vocab
        self._file = None

    def _open(self) -> None:
        name = f"shard-{len(self.records):06d}.tar"
        self._final = self.split_dir / name
        self._tmp = self.split_dir / f".{name}.tmp-{os.getpid()}"
        self._file = open(self._tmp, "wb", buffering=1 << 20)
        self._hash = hashlib.sha256()
        self._pos = 0
        self._first, self._offsets, self._sizes = self.index, [], []

    def _write(self, data: bytes) -> None:
        self._file.write(data)
        self._hash.update(data)
        self._pos += len(data)

    def add(self, samples: Iterable[np.ndarray]) -> None:
        for tokens in samples:
            if self._file is None:
                self._open()
            tokens = np.ascontiguousarray(tokens, dtype=self.dtype)
            self.max_id = max(self.max_id, int(tokens.max()))
            payload = _npy_header(self.dtype.str, tokens.size) + tokens.tobytes()
            self._write(tar_header(sample_key(self.index) + MEMBER_SUFFIX, len(payload)))
            self._offsets.append(self._pos)
            self._sizes.append(len(payload))
            self._write(payload + b"\0" * (-len(payload) % BLOCK))
            self.index += 1
            if self._pos >= self.target_bytes:
                self._close_shard()

    def _close_shard(self) -> None:
        end = self._pos + 2 * BLOCK  # two zero blocks end an archive
        self._write(b"\0" * (end + (-end % RECORD) - self._pos))
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        os.replace(self._tmp, self._final)
        self.records.append({
            "path": str(self._final.relative_to(self.data_dir)),
            "first_index": self._first,
            "samples": len(self._offsets),
            "bytes": self._pos,
            "sha256": self._hash.hexdigest(),
            "offsets": self._offsets,
            "sizes": self._sizes,
        })

    def close(self) -> list[dict]:
        """Finish the last shard; return the shard records for the manifest."""
        if self._file is not None:
            self._close_shard()
        fsync_dir(self.split_dir)
        return self.records

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._tmp.unlink(missing_ok=True)
            self._file = None


def file_problem(path: Path, record: dict) -> str | None:
    """Why a shard file does not match its manifest record (size, then sha256), or None."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return "is missing"
    if size != record["bytes"]:
        what = "truncated" if size < record["bytes"] else "longer than recorded"
        return f"is {what}: {size} bytes, manifest.json says {record['bytes']}"
    from llmforge.atomic import sha256_file

    digest = sha256_file(path)
    if digest != record["sha256"]:
        return f"checksum mismatch against manifest.json (sha256 {digest[:12]}… ≠ {record['sha256'][:12]}…)"
    return None


def find_manifest(shard: Path) -> tuple[dict, dict] | None:
    """(manifest, this shard's record) when `shard` sits in an llmforge data dir that lists it."""
    for data_dir in (shard.parent.parent, shard.parent):
        path = data_dir / "manifest.json"
        if path.is_file():
            try:
                manifest = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                return None
            rel = os.path.relpath(shard, data_dir)
            for split in manifest.get("splits", {}).values():
                for record in split.get("shards", []):
                    if record["path"] == rel:
                        return manifest, record
    return None


def iter_tar(path: Path, errors: ErrorPolicy) -> Iterator[tuple[str, np.ndarray]]:
    """(key, tokens) of every `.tokens.npy` member, read sequentially as plain tar."""
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                if not (member.isfile() and member.name.endswith(MEMBER_SUFFIX)):
                    continue
                key = member.name[: -len(MEMBER_SUFFIX)]
                try:
                    yield key, decode_npy(tar.extractfile(member).read())
                except ValueError as e:
                    errors.bad(f"{path}:{key}", f"bad tokens.npy: {e}", "prepare the shard again")
            # tarfile takes a header cut short for the end of the archive; a complete one ends in two zero blocks.
            if path.stat().st_size < tar.offset + 2 * BLOCK:
                errors.bad(str(path), f"truncated tar: {path.stat().st_size} bytes, with no end-of-archive blocks after byte {tar.offset}",
                           "prepare the shard again")
    except (tarfile.TarError, EOFError, OSError) as e:
        errors.bad(str(path), f"corrupt or truncated tar: {e}", "prepare the shard again")


class ShardReader:
    """Random access to the samples of one split by index, via the offsets in the manifest.

    Each shard is checked (size, then sha256) the first time this process opens it, so a
    corrupt or truncated shard fails loudly, naming itself, instead of feeding garbage.
    """

    def __init__(self, data_dir: Path, records: list[dict]) -> None:
        self.data_dir, self.records = data_dir, records
        self.starts = np.array([r["first_index"] for r in records], dtype=np.int64)
        self._fds: dict[int, int] = {}
        self._bad: dict[int, str] = {}

    def where(self, index: int) -> str:
        shard = int(np.searchsorted(self.starts, index, side="right")) - 1
        return f"{self.data_dir / self.records[shard]['path']}:{sample_key(index)}"

    def _fd(self, shard: int) -> int:
        fd = self._fds.get(shard)
        if fd is None:
            if shard in self._bad:
                raise ValueError(self._bad[shard])
            path = self.data_dir / self.records[shard]["path"]
            problem = file_problem(path, self.records[shard])
            if problem is not None:
                self._bad[shard] = f"{path} {problem}"
                raise ValueError(self._bad[shard])
            fd = self._fds[shard] = os.open(path, os.O_RDONLY)
        return fd

    def read(self, index: int) -> np.ndarray:
        """Sample `index` of the split. ValueError naming the shard (and sample) when it cannot."""
        shard = int(np.searchsorted(self.starts, index, side="right")) - 1
        record = self.records[shard]
        local = index - record["first_index"]
        fd = self._fd(shard)
        size = record["sizes"][local]
        buf = os.pread(fd, size, record["offsets"][local])
        try:
            return decode_npy(buf)
        except ValueError as e:
            raise ValueError(f"{self.where(index)}: {e}") from None

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
