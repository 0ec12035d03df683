"""llmforge's torch_dist reader reads what torch's own FileSystemReader reads, item for item."""

from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint import load as dcp_load
from torch.distributed.checkpoint import save as dcp_save
from torch.distributed.checkpoint.metadata import MetadataIndex
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, ReadItem

from llmforge.runtime import dcp_read
from llmforge.runtime.dcp_read import DirectReader


def _saved(tmp_path: Path) -> dict:
    generator = torch.Generator().manual_seed(0)
    state = {"w": torch.randn(64, 48, generator=generator), "b": torch.randn(48, generator=generator).to(torch.bfloat16),
             "step": torch.tensor(7), "scale": torch.zeros((), dtype=torch.float16) + 3,
             "mask": torch.rand(5, 5, generator=generator) > 0.5, "note": {"lr": 3e-4, "name": "adamw"}}
    dcp_save(state, storage_writer=FileSystemWriter(tmp_path, sync_files=False), no_dist=True)
    return state


def _fresh(state: dict) -> dict:
    return {k: torch.full_like(v, 0) if isinstance(v, torch.Tensor) else {"lr": 0.0, "name": ""} for k, v in state.items()}


def test_a_whole_checkpoint_loads_as_torch_loads_it(tmp_path):
    state = _saved(tmp_path)
    ours, theirs = _fresh(state), _fresh(state)
    dcp_load(ours, storage_reader=DirectReader(tmp_path), no_dist=True)
    dcp_load(theirs, storage_reader=FileSystemReader(tmp_path), no_dist=True)
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            assert ours[key].dtype == value.dtype and torch.equal(ours[key], theirs[key]) and torch.equal(ours[key], value), key
    assert ours["note"] == theirs["note"] == {"lr": 3e-4, "name": "adamw"}  # bytes: torch's reader, unchanged


def test_targets_of_another_dtype_or_layout_are_copied_as_torch_copies_them(tmp_path):
    state = _saved(tmp_path)
    ours = {"w": torch.empty(48, 64).t(), "b": torch.empty(48, dtype=torch.float32)}  # a transposed view; a cast
    theirs = {"w": torch.empty(48, 64).t(), "b": torch.empty(48, dtype=torch.float32)}
    dcp_load(ours, storage_reader=DirectReader(tmp_path), no_dist=True)
    dcp_load(theirs, storage_reader=FileSystemReader(tmp_path), no_dist=True)
    assert torch.equal(ours["w"], state["w"]) and torch.equal(ours["b"], theirs["b"])


class _Planner:
    """The two calls a storage reader makes on a load planner."""

    def __init__(self, targets: dict[str, torch.Tensor]):
        self.targets, self.committed = targets, []

    def resolve_tensor(self, item: ReadItem) -> torch.Tensor:
        return self.targets[item.dest_index.fqn]

    def commit_tensor(self, item: ReadItem, tensor: torch.Tensor) -> None:
        self.committed.append(item.dest_index.fqn)


def test_a_piece_of_a_saved_tensor_reads_as_torch_reads_it(tmp_path):
    """What a resharded load asks for: rows 16..47 of a saved tensor into a shard of its own."""
    state = _saved(tmp_path)
    plan = LoadPlan([ReadItem(type=LoadItemType.TENSOR, dest_index=MetadataIndex("w", (0, 0)), dest_offsets=torch.Size((0, 0)),
                              storage_index=MetadataIndex("w", (0, 0)), storage_offsets=torch.Size((16, 8)), lengths=torch.Size((32, 40)))])
    results = []
    for reader in (DirectReader(tmp_path), FileSystemReader(tmp_path)):
        reader.set_up_storage_reader(reader.read_metadata(), is_coordinator=True)
        planner = _Planner({"w": torch.zeros(32, 40)})
        reader.read_data(plan, planner).wait()
        assert planner.committed == ["w"]
        results.append(planner.targets["w"])
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], state["w"][16:48, 8:48])


def _records_of(tensor: torch.Tensor) -> dict[str, bytes]:
    saved = io.BytesIO()
    torch.save(tensor, saved)
    with zipfile.ZipFile(saved) as archive:
        return {info.filename: archive.read(info) for info in archive.infolist()}


def _records_of_bytes(tensor: torch.Tensor) -> bytes:
    saved = io.BytesIO()
    torch.save(tensor, saved)
    return saved.getvalue()


def _parse(tmp_path: Path, payload: bytes):
    path = tmp_path / "record.bin"
    path.write_bytes(b"prefix--" + payload + b"--suffix")
    with open(path, "rb", buffering=0) as f:
        record = dcp_read._record(f.fileno(), 8, len(payload))
        out = torch.empty(record.shape, dtype=record.dtype)
        dcp_read._read_into(f, record.data_start, out)
    return record, out


def test_a_record_is_read_whatever_its_local_headers_carry(tmp_path):
    """The data's place comes from each local header's own lengths: here ZIP64 extra fields, as large records have."""
    tensor = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    wide = io.BytesIO()
    with zipfile.ZipFile(wide, "w") as archive:
        for name, data in _records_of(tensor).items():
            with archive.open(name, "w", force_zip64=True) as entry:
                entry.write(data)
    record, out = _parse(tmp_path, wide.getvalue())
    assert record.shape == (3, 4) and torch.equal(out, tensor)


@pytest.mark.parametrize("case", ["view", "foreign_class", "compressed", "zip64_directory"])
def test_records_it_does_not_know_are_left_to_torch(tmp_path, case):
    tensor = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    if case == "zip64_directory":  # what a record over 4 GiB ends with
        payload = _records_of_bytes(tensor)
        end = payload.rfind(b"PK\x05\x06")
        payload = payload[:end + 12] + b"\xff\xff\xff\xff" * 2 + payload[end + 20:]
    elif case == "view":
        payload = _records_of_bytes(tensor[1:])  # torch.save keeps the whole storage: offset 4
    else:
        records = _records_of(tensor)
        if case == "foreign_class":  # a pickle naming something other than a tensor rebuild is never run
            pkl = next(name for name in records if name.endswith("data.pkl"))
            records[pkl] = pickle.dumps(print)
        packed = io.BytesIO()
        with zipfile.ZipFile(packed, "w", zipfile.ZIP_DEFLATED if case == "compressed" else zipfile.ZIP_STORED) as archive:
            for name, data in records.items():
                archive.writestr(name, data)
        payload = packed.getvalue()
    with pytest.raises(dcp_read._NotATensorRecord):
        _parse(tmp_path, payload)
