"""Reading torch_dist checkpoint files: each tensor read once, straight into where it goes.

torch's FileSystemReader decodes every tensor record with `torch.load(weights_only=True)`:
its pure-Python unpickler and a zip reader per record took ~0.4 ms a tensor, ~40% of a tiny
model's load (107 records), and each tensor was read into a fresh one and copied again. A
record is a `torch.save` archive of one tensor: an uncompressed zip of a small pickle (dtype,
shape, stride) and the raw storage. Here the pickle goes through a C unpickler that knows
nothing but a tensor's rebuild, and the storage bytes are read by `readinto` into the
destination itself when the record is the whole, contiguous destination (the same layout, or
a resharding that reads whole chunks); otherwise into a buffer, then narrowed and copied.
A record this does not recognize (another format, compression, a view) is left to torch's own
reader, so everything torch reads still loads.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import os
import pickle
import struct
from typing import Any, NamedTuple

import torch
from megatron.core.dist_checkpointing.strategies.cached_metadata_filesystem_reader import CachedMetadataFileSystemReader
from torch.distributed._shard._utils import narrow_tensor_by_index
from torch.distributed.checkpoint.planner import LoadItemType
from torch.futures import Future

# The storage classes a record names (`torch.save` keeps the legacy names), by the dtype they hold.
_DTYPES = {"FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
           "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
           "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool}
# The zip structures of a record: local file header (signature ... name and extra field lengths),
# central directory entry, end of central directory.
_LOCAL = struct.Struct("<4s22xHH")
_CENTRAL = struct.Struct("<4s6xH8xIIHHH8xI")
_END = struct.Struct("<4x6xHII")
# Sizes or offsets past 4 GiB move into ZIP64 fields: such a record is large enough that torch's
# per-record cost does not matter, so it goes to torch's reader.
_ZIP64 = "a ZIP64 record"


class _Record(NamedTuple):
    dtype: torch.dtype
    shape: tuple[int, ...]
    data_start: int  # in the file


class _NotATensorRecord(Exception):
    pass


def _rebuild(storage, storage_offset, size, stride, *_):
    dtype, numel = storage
    shape = tuple(size)
    contiguous, step = [], 1
    for d in reversed(shape):
        contiguous.append(step)
        step *= d
    if storage_offset != 0 or tuple(stride) != tuple(reversed(contiguous)) or numel != _numel(shape):
        raise _NotATensorRecord("a view of a larger storage")
    return dtype, shape


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


class _TensorUnpickler(pickle.Unpickler):
    """The pickle of one `torch.save(tensor)`, and nothing else: no other class can be named."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild
        if module == "torch" and name in _DTYPES:
            return _DTYPES[name]
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        raise _NotATensorRecord(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and pid[2] == "0" and isinstance(pid[1], torch.dtype)):
            raise _NotATensorRecord(f"storage {pid!r}")
        return pid[1], pid[4]


class _Span:
    """A record's bytes: its first and last 4 KiB read at once (a tensor record's small entries and
    central directory lie there, so a record costs two reads before its data), the rest on demand."""

    EDGE = 4096

    def __init__(self, fd: int, start: int, length: int):
        self.fd, self.start, self.length = fd, start, length
        n = min(length, self.EDGE)
        self.head = os.pread(fd, n, start)
        self.tail_at = length - n
        self.tail = self.head if self.tail_at == 0 else os.pread(fd, n, start + self.tail_at)

    def read(self, pos: int, n: int) -> bytes:
        if pos + n <= len(self.head):
            return self.head[pos:pos + n]
        if self.tail_at <= pos and pos + n <= self.length:
            return self.tail[pos - self.tail_at:pos - self.tail_at + n]
        return os.pread(self.fd, n, self.start + pos)


def _entries(span: _Span) -> dict[str, tuple[int, int, int]]:
    """{name without the archive's folder: (compression, size, local header offset)} from the record's central directory."""
    end = span.tail.rfind(b"PK\x05\x06")
    if end < 0 or len(span.tail) - end < _END.size:
        raise _NotATensorRecord("no end of central directory")
    count, size, offset = _END.unpack_from(span.tail, end)
    if 0xFFFFFFFF in (size, offset) or count == 0xFFFF:
        raise _NotATensorRecord(_ZIP64)
    directory = span.read(offset, size)
    entries, pos = {}, 0
    for _ in range(count):
        signature, method, csize, usize, name_length, extra_length, comment_length, header = _CENTRAL.unpack_from(directory, pos)
        if signature != b"PK\x01\x02":
            raise _NotATensorRecord("bad central directory")
        pos += _CENTRAL.size
        name = directory[pos:pos + name_length].decode()
        pos += name_length + extra_length + comment_length
        if 0xFFFFFFFF in (usize, csize, header):
            raise _NotATensorRecord(_ZIP64)
        entries[name.split("/", 1)[-1]] = (method, usize, header)
    return entries


def _data_at(span: _Span, header: int) -> int:
    """Where an entry's data starts in the record, from its local header (whose extra field pads it to alignment)."""
    signature, name_length, extra_length = _LOCAL.unpack(span.read(header, _LOCAL.size))
    if signature != b"PK\x03\x04":
        raise _NotATensorRecord("bad local header")
    return header + _LOCAL.size + name_length + extra_length


def _record(fd: int, start: int, length: int) -> _Record:
    """What a tensor record holds, and where its bytes start in the file. Raises _NotATensorRecord."""
    span = _Span(fd, start, length)
    entries = _entries(span)
    pickled, data, order = entries.get("data.pkl"), entries.get("data/0"), entries.get("byteorder")
    if pickled is None or data is None or pickled[0] != 0 or data[0] != 0:
        raise _NotATensorRecord("not an uncompressed torch.save archive")
    if order is not None and span.read(_data_at(span, order[2]), order[1]) != b"little":
        raise _NotATensorRecord("big-endian")
    dtype, shape = _TensorUnpickler(io.BytesIO(span.read(_data_at(span, pickled[2]), pickled[1]))).load()
    if data[1] != _numel(shape) * dtype.itemsize:
        raise _NotATensorRecord("unexpected storage size")
    return _Record(dtype, shape, start + _data_at(span, data[2]))


def _read_into(f: io.FileIO, position: int, tensor: torch.Tensor) -> None:
    """Fill the contiguous CPU `tensor` with the bytes at `position`."""
    view = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
    f.seek(position)
    done = 0
    while done < len(view):
        n = f.readinto(view[done:])
        if not n:
            raise EOFError(f"{f.name}: {len(view) - done} bytes missing at {position + done}")
        done += n


class DirectReader(CachedMetadataFileSystemReader):
    """megatron's torch_dist reader (metadata read once), reading tensor records as the module docstring says."""

    def read_as_saved(self, flat: dict[str, list]) -> dict[str, list] | None:
        """megatron's flat sharded state dict ({key: [ShardedTensor...] or [ShardedObject...]}) read without torch's planner.

        Only when every ShardedTensor is one whole saved chunk, as at a resume at the layout it
        was saved at; its data is filled in place. ShardedObjects are unpickled as torch's
        planner does (`torch.load(..., weights_only=False)`). Returns {key: [tensor or object...]}
        as megatron's load does, or None (with anything read so far to be overwritten): a
        resharding, a flattened optimizer shard, a record this reader does not know.
        """
        from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor
        from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex, TensorStorageMetadata

        metadata = self.read_metadata()
        plan: list[tuple[str, Any, Any]] = []  # (key, a ShardedTensor or the key's ShardedObjects, where it is)
        for key, group in flat.items():
            saved = metadata.state_dict_metadata.get(key)
            if all(isinstance(entry, ShardedObject) for entry in group):
                info = metadata.storage_data.get(MetadataIndex(key))
                if not isinstance(saved, BytesStorageMetadata) or info is None or info.transform_descriptors:
                    return None
                plan.append((key, group, info))
                continue
            for shard in group:
                # (allow_shape_mismatch, a padded vocabulary, needs no care here: the shapes must match exactly)
                if (not isinstance(shard, ShardedTensor) or shard.flattened_range is not None or shard.data is None
                        or shard.data.device.type != "cpu"):
                    return None
                offsets, shape = tuple(shard.global_offset), (1,) * shard.prepend_axis_num + tuple(shard.local_shape)
                if (not isinstance(saved, TensorStorageMetadata) or tuple(saved.size) != tuple(shard.global_shape)
                        or not any(tuple(c.offsets) == offsets and tuple(c.sizes) == shape for c in saved.chunks)):
                    return None
                info = metadata.storage_data.get(MetadataIndex(key, torch.Size(offsets)))
                if info is None or info.transform_descriptors:
                    return None
                plan.append((key, shard, info))
        out: dict[str, list] = {key: [] for key in flat}
        files: dict[str, io.FileIO] = {}
        try:
            for key, entry, info in sorted(plan, key=lambda step: (step[2].relative_path, step[2].offset)):
                if info.relative_path not in files:
                    files[info.relative_path] = open(self.fs.concat_path(self.path, info.relative_path), "rb", buffering=0)
                f = files[info.relative_path]
                if isinstance(entry, list):
                    objects = torch.load(io.BytesIO(os.pread(f.fileno(), info.length, info.offset)), weights_only=False)
                    if len(objects) != len(entry):
                        return None
                    out[key] = objects
                elif not self._fill(f, entry.data, info):
                    return None
        finally:
            for f in files.values():
                f.close()
        for key, group in flat.items():  # a key's shards in their order in the group, as megatron returns them
            if isinstance(group[0], ShardedTensor):
                out[key] = [shard.data for shard in group]
        return out

    @staticmethod
    def _fill(f: io.FileIO, target: torch.Tensor, info) -> bool:
        target = target.detach()  # the same storage; a parameter that requires grad refuses in-place copies
        try:
            record = _record(f.fileno(), info.offset, info.length)
        except (_NotATensorRecord, pickle.UnpicklingError, struct.error, ValueError, TypeError, EOFError):
            return False
        if _numel(record.shape) != target.numel():
            return False
        if target.dtype == record.dtype and target.is_contiguous():
            _read_into(f, record.data_start, target)
        else:  # a weight of another precision (cast on load), a strided view
            saved = torch.empty(record.shape, dtype=record.dtype)
            _read_into(f, record.data_start, saved)
            target.copy_(saved.view(target.shape))
        return True

    def read_data(self, plan, planner) -> Future[None]:
        by_file: dict[str, list] = {}
        for item in plan.items:
            by_file.setdefault(self.storage_data[item.storage_index].relative_path, []).append(item)
        left = []
        for relative_path, items in by_file.items():
            with open(self.fs.concat_path(self.path, relative_path), "rb", buffering=0) as f:
                for item in sorted(items, key=lambda i: self.storage_data[i.storage_index].offset):
                    if not self._read_tensor(f, item, planner):
                        left.append(item)
        if left:  # bytes (ShardedObjects) and records this reader does not know: torch's own reader
            super().read_data(dataclasses.replace(plan, items=left), planner).wait()
        done: Future[None] = Future()
        done.set_result(None)
        return done

    def _read_tensor(self, f: io.FileIO, item, planner) -> bool:
        info = self.storage_data[item.storage_index]
        if item.type == LoadItemType.BYTE_IO or info.transform_descriptors:
            return False
        try:
            record = _record(f.fileno(), info.offset, info.length)
        except (_NotATensorRecord, pickle.UnpicklingError, struct.error, ValueError, TypeError, EOFError):
            return False
        target = planner.resolve_tensor(item).detach()
        offsets, lengths = tuple(item.storage_offsets), tuple(item.lengths)
        if tuple(target.shape) != lengths:
            return False  # torch's reader says what is wrong
        if (target.device.type == "cpu" and target.dtype == record.dtype and target.is_contiguous()
                and lengths == record.shape and not any(offsets)):
            _read_into(f, record.data_start, target)
        else:
            saved = torch.empty(record.shape, dtype=record.dtype)
            _read_into(f, record.data_start, saved)
            target.copy_(narrow_tensor_by_index(saved, offsets, lengths))
        planner.commit_tensor(item, target)
        return True
