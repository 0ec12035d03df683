"""Output directories appear whole or not at all; weights shard with an index and read back."""

from __future__ import annotations

import json

import pytest
import torch

from llmforge.interop.hf_files import SAFETENSORS, SAFETENSORS_INDEX, read_hf_weights, staged_output, write_safetensors
from llmforge.spec.errors import UserError


def test_a_failed_write_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"):
        with staged_output(out, overwrite=False) as tmp:
            (tmp / "config.json").write_text("{}")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_a_non_empty_output_is_refused_unless_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(UserError, match="(?s)exists and is not empty.*--overwrite"):
        with staged_output(out, overwrite=False):
            pytest.fail("the body must not run")
    with staged_output(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
        assert (out / "old.txt").exists()  # replaced only once the new one is complete
    assert [p.name for p in out.iterdir()] == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_an_empty_output_dir_is_used(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with staged_output(out, overwrite=False) as tmp:
        (tmp / "a").write_text("a")
    assert (out / "a").read_text() == "a"


def test_large_weights_are_sharded_with_an_index(tmp_path):
    tensors = {f"layer.{i}.weight": torch.full((64, 64), float(i)) for i in range(5)}  # 16 KiB each
    files = write_safetensors(tmp_path, tensors, max_shard_bytes=40_000)
    assert files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)] + [SAFETENSORS_INDEX]
    index = json.loads((tmp_path / SAFETENSORS_INDEX).read_text())
    assert index["metadata"]["total_size"] == 5 * 64 * 64 * 4
    assert index["weight_map"]["layer.4.weight"] == "model-00003-of-00003.safetensors"
    back = read_hf_weights(tmp_path)
    assert back.keys() == tensors.keys() and all(torch.equal(back[n], tensors[n]) for n in tensors)


def test_small_weights_are_one_file_and_views_are_written_whole(tmp_path):
    base = torch.arange(12.0).reshape(3, 4)
    files = write_safetensors(tmp_path, {"a": base[:2], "b": base.t()})  # views sharing one storage
    assert files == [SAFETENSORS]
    back = read_hf_weights(tmp_path)
    assert torch.equal(back["a"], base[:2]) and torch.equal(back["b"], base.t())


def test_missing_weights_and_shards_are_named(tmp_path):
    with pytest.raises(UserError, match="no weights"):
        read_hf_weights(tmp_path)
    (tmp_path / SAFETENSORS_INDEX).write_text(json.dumps({"weight_map": {"x": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(UserError, match="model-00001-of-00002.safetensors not found"):
        read_hf_weights(tmp_path)
    (tmp_path / SAFETENSORS_INDEX).unlink()
    (tmp_path / SAFETENSORS).write_bytes(b"not safetensors")
    with pytest.raises(UserError, match="cannot read the weights"):
        read_hf_weights(tmp_path)
