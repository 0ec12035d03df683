"""Conversions at real sizes: a megatron checkpoint written, read and run a tensor or a layer at a time.

The skeleton model (`model_io.skeleton_model`, every parameter on the meta device) gives the
checkpoint's layout: each tensor's global key, shape and offsets, as the real model saves them.
Import writes through it with a save planner that makes each tensor only when torch's writer
reaches it and frees it once written (`save_streamed`); export reads the checkpoint one layer
at a time (`CheckpointReader`) and runs llmforge's own forward pass for its self-check with
each layer's weights in memory only while that layer runs (`streamed_logits`). Neither ever
holds the whole model: the peak is about the embedding plus one layer, in fp32.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llmforge.interop.hf_mapping import canonical_name

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


def layer_of(name: str) -> int | None:
    """The decoder layer a canonical megatron name belongs to (None: embedding, final norm, output layer)."""
    match = _LAYER.match(name)
    return int(match.group(1)) if match else None


def _sharded_entries(skeleton: torch.nn.Module) -> dict[str, Any]:
    """Local name → the skeleton's sharded entry (ShardedTensor, factory or ShardedObject), as a checkpoint saves them."""
    from llmforge.runtime.sharded_io import model_sharded_state

    return model_sharded_state([skeleton])["chunk0"]


# --- writing ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Chunk:
    """Where one saved piece (a checkpoint key at an offset) lies in a canonical megatron tensor."""

    name: str
    index: tuple[slice, ...]
    whole: bool


def _chunks(entries: dict[str, Any]) -> dict[tuple[str, tuple[int, ...]], _Chunk]:
    """(checkpoint key, global offset) → the canonical tensor and slice its data is, for every tensor the skeleton saves.

    At TP=1 a local tensor is the global one without the prepended layer axis; a factory
    (swiglu's `linear_fc1`) saves its tensor in pieces, each at its own offset.
    """
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    table = {}
    for local, item in entries.items():
        pieces = list(nested_values(item.build())) if isinstance(item, ShardedTensorFactory) else [item]
        for piece in pieces:
            if isinstance(piece, ShardedTensor):
                inner = piece.global_offset[piece.prepend_axis_num:]
                index = tuple(slice(o, o + n) for o, n in zip(inner, piece.local_shape, strict=True))
                whole = len(pieces) == 1 and not any(inner)
                table[(piece.key, tuple(piece.global_offset))] = _Chunk(canonical_name(local), index, whole)
    return table


def _streaming_strategy(make: Callable[[str], torch.Tensor], chunks: dict[tuple[str, tuple[int, ...]], _Chunk]):
    """megatron's torch_dist format, written by torch's FileSystemWriter one tensor at a time, each made on demand."""
    from megatron.core.dist_checkpointing.strategies.torch import (
        MCoreSavePlanner,
        TorchDistSaveShardedStrategy,
        _replace_state_dict_keys_with_sharded_keys,
        mcore_to_pyt_state_dict,
    )
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint import save as dcp_save
    from torch.distributed.checkpoint.planner import WriteItemType

    class MakeOnWrite(MCoreSavePlanner):
        """Resolves each tensor by making it; the skeleton's own data is on the meta device."""

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self._written: torch.Tensor | None = None
            self._source: tuple[str | None, torch.Tensor | None] = (None, None)  # a tensor saved in pieces, until its last piece

        def resolve_data(self, write_item):
            if write_item.type == WriteItemType.BYTE_IO:
                return super().resolve_data(write_item)
            # torch's writer asks for items one at a time (one thread, no copy-ahead), writes each
            # before asking for the next, and keeps the last tensor of every key in a dict that this
            # format never reads: free the previous one's storage instead of letting the model pile up.
            if self._written is not None and self._written.untyped_storage().resizable():
                self._written.untyped_storage().resize_(0)
            chunk = chunks[(write_item.index.fqn, tuple(write_item.tensor_data.chunk.offsets))]
            sizes = tuple(write_item.tensor_data.chunk.sizes)
            if chunk.whole:
                self._source = (None, None)
                data = make(chunk.name).reshape(sizes)
            else:
                name, source = self._source
                if name != chunk.name:
                    self._source = (None, None)
                    source = make(chunk.name)
                    self._source = (chunk.name, source)
                data = source[chunk.index].reshape(sizes).clone()
            self._written = data
            return data

    class StreamingSave(TorchDistSaveShardedStrategy):
        def save(self, sharded_state_dict, checkpoint_dir: Path) -> None:
            sharded_state_dict, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, self.keep_only_main_replica)
            dcp_save(
                mcore_to_pyt_state_dict(sharded_state_dict, False),
                storage_writer=FileSystemWriter(checkpoint_dir, thread_count=1, sync_files=False, per_thread_copy_ahead=0),
                planner=MakeOnWrite(dedup_replicated_tensors=not self.keep_only_main_replica, flatten_state_dict=False),
                no_dist=True,
            )

    return StreamingSave("torch_dist", 1)


def save_streamed(model_dir: Path, skeleton: torch.nn.Module, make: Callable[[str], torch.Tensor], common: dict[str, Any]) -> None:
    """Save a checkpoint of the skeleton's layout into the empty directory `model_dir` (what `save_sharded` writes
    for the real model), each tensor made by `make(canonical name)` when its turn comes.

    `make` must return a new fp32 tensor of the canonical shape each call; it is freed once written.
    """
    from megatron.core import dist_checkpointing

    entries = _sharded_entries(skeleton)
    strategy = _streaming_strategy(make, _chunks(entries))
    dist_checkpointing.save({"model": {"chunk0": entries}, "common": common}, str(model_dir), sharded_strategy=strategy,
                            validate_access_integrity=True)


# --- reading ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Region:
    """Where a canonical megatron tensor lies in the checkpoint: a key, and the offset of its block in the
    key's global tensor (the layer, for tensors stacked over the layers; zeros elsewhere at TP=1)."""

    key: str
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    shape: tuple[int, ...]


def _regions(entries: dict[str, Any]) -> dict[str, _Region]:
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    out = {}
    for local, item in entries.items():
        if isinstance(item, ShardedTensorFactory):
            first = next(p for p in nested_values(item.build()) if isinstance(p, ShardedTensor))
        elif isinstance(item, ShardedTensor):
            first = item
        else:
            continue
        shape, outer = tuple(item.data.shape), tuple(first.global_offset[:first.prepend_axis_num])
        out[canonical_name(local)] = _Region(first.key, outer + (0,) * len(shape), (1,) * len(outer) + shape, shape)
    return out


def _boxes(regions: list[_Region]) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """Checkpoint key → (offsets, sizes) of the smallest block holding every region of it: one layer of a
    stacked tensor, or all of a layer's experts (which share one key, one block per expert)."""
    out: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
    for r in regions:
        ends = tuple(o + n for o, n in zip(r.offsets, r.sizes, strict=True))
        if r.key in out:
            start, size = out[r.key]
            ends = tuple(max(e, a + n) for e, a, n in zip(ends, start, size, strict=True))
            start = tuple(min(o, a) for o, a in zip(r.offsets, start, strict=True))
        else:
            start = r.offsets
        out[r.key] = (start, tuple(e - a for e, a in zip(ends, start, strict=True)))
    return out


def _region_planner(boxes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]]):
    """torch's load planner, asked for one block of each key (a layer of a stacked tensor) rather than the whole of it;
    torch's resharding reads it from whatever chunks any TP/PP/EP layout saved."""
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
    from torch.distributed.checkpoint.planner import LoadPlan
    from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

    class Blocks(DefaultLoadPlanner):
        def create_local_plan(self) -> LoadPlan:
            items = []
            for key, tensor in self.state_dict.items():
                chunk = ChunkStorageMetadata(offsets=torch.Size(boxes[key][0]), sizes=tensor.size())
                items += create_read_items_for_chunk_list(key, self.metadata.state_dict_metadata[key], [chunk])
            return LoadPlan(items)

        def lookup_tensor(self, index):
            return self.state_dict[index.fqn]

    return Blocks(flatten_state_dict=False, flatten_sharded_tensors=False)


class CheckpointReader:
    """The canonical megatron tensors of a sharded checkpoint (any TP/PP layout), as fp32, read a group at a time:
    a decoder layer whole, or one of the tensors outside the layers. Only the last group read stays cached."""

    def __init__(self, model_dir: Path, skeleton: torch.nn.Module) -> None:
        from llmforge.interop.model_io import check_fits

        self.model_dir = Path(model_dir)
        self._dtypes = check_fits(self.model_dir, skeleton)
        self._regions = _regions(_sharded_entries(skeleton))
        self._cache: dict[str, torch.Tensor] = {}

    @property
    def names(self) -> list[str]:
        """The canonical names of every tensor the checkpoint holds for the model."""
        return list(self._regions)

    def get(self, name: str) -> torch.Tensor:
        """The canonical tensor `name` (fp32); reading it drops the group read before."""
        if name not in self._cache:
            self._cache = {}
            layer = layer_of(name)
            group = [name] if layer is None else [n for n in self._regions if layer_of(n) == layer]
            self._cache = self._load(group)
        return self._cache[name]

    def clear(self) -> None:
        self._cache = {}

    def _load(self, names: list[str]) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint import load as dcp_load

        regions = {name: self._regions[name] for name in names}
        boxes = _boxes(list(regions.values()))
        blocks = {key: torch.empty(sizes, dtype=self._dtypes.get(key, torch.float32)) for key, (_, sizes) in boxes.items()}
        dcp_load(blocks, storage_reader=FileSystemReader(str(self.model_dir)), planner=_region_planner(boxes), no_dist=True)
        out = {}
        for name, r in regions.items():
            start = boxes[r.key][0]
            index = tuple(slice(o - a, o - a + n) for o, a, n in zip(r.offsets, start, r.sizes, strict=True))
            out[name] = blocks[r.key][index].reshape(r.shape).to(torch.float32)
        return out


# --- llmforge's forward pass, a layer at a time -----------------------------------------------


def _owner(module: torch.nn.Module, name: str) -> tuple[torch.nn.Module, str]:
    path, _, leaf = name.rpartition(".")
    return (module.get_submodule(path) if path else module), leaf


def compute_device() -> torch.device:
    """Where megatron's modules compute in this process: the current GPU when there is one (its RoPE moves there), else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _materialize_while_running(module: torch.nn.Module, prefix: str, reader: CheckpointReader, rounded_to: torch.dtype, *,
                               skip: str | None = None) -> list:
    """Hooks that give `module`'s parameters (except those under `skip`) the reader's tensors, rounded to
    `rounded_to` and held in fp32 on the compute device, for the length of its forward call, and the meta ones back afterwards."""
    swapped: dict[str, torch.nn.Parameter] = {}

    def before(mod, args):
        for name, param in list(mod.named_parameters()):
            if skip is None or not name.startswith(skip):
                owner, leaf = _owner(mod, name)
                swapped[name] = param
                weight = reader.get(canonical_name(prefix + name)).to(rounded_to).to(compute_device(), torch.float32)
                owner._parameters[leaf] = torch.nn.Parameter(weight, requires_grad=False)
        reader.clear()  # the parameters hold what they need; a rounded copy must not sit beside the read one

    def after(mod, args, output):
        for name, param in swapped.items():
            owner, leaf = _owner(mod, name)
            owner._parameters[leaf] = param
        swapped.clear()

    return [module.register_forward_pre_hook(before), module.register_forward_hook(after)]


def streamed_logits(skeleton: torch.nn.Module, reader: CheckpointReader, ids: torch.Tensor, *,
                    rounded_to: torch.dtype = torch.float32) -> torch.Tensor:
    """llmforge's own forward pass (megatron's GPTModel) of the checkpoint on `ids`, in fp32: full logits [batch, seq, vocab].

    The embedding, final norm and output layer are read for the whole pass, each decoder layer
    only while it runs, so the model is never whole in memory.

    Args:
        rounded_to: round each weight to this dtype first (the weights a bf16 export holds).
    """
    handles = _materialize_while_running(skeleton, "", reader, rounded_to, skip="decoder.layers.")
    for index, layer in enumerate(skeleton.decoder.layers):
        handles += _materialize_while_running(layer, f"decoder.layers.{index}.", reader, rounded_to)
    skeleton.eval()
    ids = ids.to(compute_device())
    positions = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0).expand_as(ids)
    try:
        with torch.no_grad():
            return skeleton(ids, positions, None).float().cpu()
    finally:
        for handle in handles:
            handle.remove()
        reader.clear()
