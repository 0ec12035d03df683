"""Shard files: byte-exact tar headers, strict .npy decoding, random access by offset."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest

from llmforge.data.prepare import token_dtype
from llmforge.data.shards import ShardReader, ShardWriter, decode_npy, tar_header


@pytest.mark.parametrize(("name", "size"), [("0000000001.tokens.npy", 642), ("x" * 99, 0), ("a", 8**11 - 1)])
def test_tar_header_is_what_tarfile_writes(name, size):
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    assert tar_header(name, size) == info.tobuf(format=tarfile.USTAR_FORMAT)


def test_decode_npy_accepts_token_arrays_only():
    buf = io.BytesIO()
    np.save(buf, np.arange(5, dtype=np.uint16))
    assert decode_npy(buf.getvalue()).tolist() == [0, 1, 2, 3, 4]
    for bad, message in [
        (b"PK\x03\x04 not npy", "bad magic"),
        (buf.getvalue()[:-2], "header says 5"),
    ]:
        with pytest.raises(ValueError, match=message):
            decode_npy(bad)
    floats = io.BytesIO()
    np.save(floats, np.ones(3, dtype=np.float32))
    with pytest.raises(ValueError, match="must be integers"):
        decode_npy(floats.getvalue())
    objects = io.BytesIO()
    np.save(objects, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError):
        decode_npy(objects.getvalue())


def test_token_dtype_and_uint32_shards(tmp_path):
    assert token_dtype(65535) == np.uint16 and token_dtype(65536) == np.uint32
    writer = ShardWriter(tmp_path, "train", target_bytes=1 << 20, dtype=np.uint32)
    writer.add([np.array([70000, 1, 2]), np.array([5, 100000])])
    records = writer.close()
    reader = ShardReader(tmp_path, records)
    assert reader.read(1).tolist() == [5, 100000] and reader.read(0).dtype == np.uint32
    assert records[0]["samples"] == 2 and writer.max_id == 100000
    assert not list(tmp_path.joinpath("train").glob(".*"))  # no temporary files left behind


def test_shards_roll_over_at_the_target_size(tmp_path):
    writer = ShardWriter(tmp_path, "val", target_bytes=4096, dtype=np.uint16)
    writer.add(np.arange(100 * 17).reshape(100, 17))
    records = writer.close()
    assert len(records) > 1 and sum(r["samples"] for r in records) == 100
    assert [r["first_index"] for r in records] == [sum(r["samples"] for r in records[:i]) for i in range(len(records))]
    reader = ShardReader(tmp_path, records)
    assert all(reader.read(i).tolist() == list(range(i * 17, i * 17 + 17)) for i in (0, 37, 99))
    for r in records:
        assert (tmp_path / r["path"]).stat().st_size % (20 * 512) == 0  # whole tar records, as GNU tar writes
