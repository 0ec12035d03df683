"""A batch of fixed-size samples read in one gather from the mapped shards.

A pretraining split's samples are all one size (a `.npy` header and seq_length + 1 ids), at
offsets the manifest records. Read one by one (`ShardReader.read`), a batch of 12 costs ~25
numpy and syscall calls per sample; between training steps, with the step's work having
evicted the caches, that was ~0.44 ms a batch at nanoGPT's shakespeare-char shape (issue 31,
docs/performance.md). `RowGather` maps each shard once (after `ShardReader` has checked its
size and sha256) and reads a batch as one fancy index of [samples, sample bytes], checking
every sample's size and header bytes; anything else (a padded or damaged sample) gives None,
and the loader reads that batch one sample at a time, which names the problem.
"""

from __future__ import annotations

import mmap

import numpy as np

from llmforge.data.shards import ShardReader, _npy_header


class RowGather:
    """Batches of `length` ids per sample of `dtype`, from the shards `reader` opens (and checks)."""

    def __init__(self, reader: ShardReader, dtype: str, length: int) -> None:
        self.reader, self.length = reader, length
        self.dtype = np.dtype(dtype)
        header = _npy_header(self.dtype.str, length)
        self.header = np.frombuffer(header, dtype=np.uint8)
        self.size = len(header) + length * self.dtype.itemsize  # bytes of one whole sample
        self.columns = np.arange(self.size)
        self._shards: dict[int, tuple[mmap.mmap, np.ndarray, np.ndarray, np.ndarray]] = {}

    def _shard(self, shard: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(bytes, offsets, sizes) of one shard, mapped on first use."""
        if shard not in self._shards:
            record = self.reader.records[shard]
            fd = self.reader._fd(shard)  # checks the shard (size, sha256) the first time, raising ValueError
            mapped = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
            self._shards[shard] = (mapped, np.frombuffer(mapped, dtype=np.uint8),
                                   np.asarray(record["offsets"], dtype=np.int64), np.asarray(record["sizes"], dtype=np.int64))
        return self._shards[shard][1:]

    def rows(self, indices: list[int]) -> np.ndarray | None:
        """The samples as int64 rows [len(indices), length], or None when any is not a whole sample of that shape."""
        indices = np.asarray(indices, dtype=np.int64)
        shards = np.searchsorted(self.reader.starts, indices, side="right") - 1
        out = np.empty((len(indices), self.length), dtype=np.int64)
        for shard in np.unique(shards).tolist():
            take = shards == shard
            data, offsets, sizes = self._shard(shard)
            local = indices[take] - self.reader.records[shard]["first_index"]
            if (sizes[local] != self.size).any():
                return None
            raw = data[offsets[local][:, None] + self.columns]
            if not (raw[:, : len(self.header)] == self.header).all():
                return None
            out[take] = raw[:, len(self.header):].view(self.dtype)
        return out

    def close(self) -> None:
        while self._shards:
            _, entry = self._shards.popitem()
            mapped = entry[0]
            del entry  # its array views the map; the rows handed out are copies
            try:
                mapped.close()
            except BufferError:  # something else still views it: the map closes when that goes
                pass
