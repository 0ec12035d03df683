"""Raw sharded save and load of model and optimizer with megatron's dist_checkpointing.

Each tensor is saved under its global key and shape (`sharded_state_dict()`), so a
checkpoint written at one TP/PP/DP layout loads at another. Plain
`torch.distributed.checkpoint` on `state_dict()` silently drops TP shards (it records
local shapes as global). The atomic temp-dir, marker and retention layer is the caller's.

A save is staged (`_stage`: megatron's preprocessing, torch's planner, the collectives) and
then written (`StagedWrite`); inside `deferred_writes()` the write waits, with the tensors
copied, for a thread of `CheckpointManager.save_async`. Loads read with `dcp_read.DirectReader`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Callable

import torch

from llmforge.models.init import unwrap
from llmforge.spec.errors import UserError


def _metadata() -> dict[str, Any]:
    # A fresh dict per call: megatron caches the current DP group in it.
    # fully_reshardable is the only optimizer layout that reshards across DP sizes;
    # megatron's default raises on `flattened_range` when the DistributedOptimizer saves.
    return {"distrib_optim_sharding_type": "fully_reshardable"}


class StagedWrite:
    """One directory of a sharded save, staged: its plan made and, for a save in the background, its tensors copied.

    What is left needs no other rank and no collective, so it may run in any thread:
    `write()` writes this rank's file and returns what it wrote; `finish(results)`, on rank 0
    with every rank's `write()` result, writes the metadata that makes the directory readable.
    The format is megatron's torch_dist, as `dist_checkpointing.save` writes it.
    """

    def __init__(self, path: Path, writer, planner, plan, metadata, dist) -> None:
        self.path, self.writer, self.planner, self.plan, self.metadata, self.dist = path, writer, planner, plan, metadata, dist

    def write(self) -> list:
        # Each tensor is a torch.save zip record, whose CRC-32 torch computes while holding the GIL (it
        # was 60% of the write, and stalled the training thread during a save in the background).
        # The marker's checksum covers every byte; torch.load does not need the zip's.
        from torch.utils.serialization import config

        crc, config.save.compute_crc32 = config.save.compute_crc32, False
        try:
            return self.writer.write_data(self.plan, self.planner).value()
        finally:
            config.save.compute_crc32 = crc

    def finish(self, results: list[list]) -> None:
        from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config

        self.writer.finish(self.metadata, results)
        save_config(CheckpointingConfig("torch_dist", 1), str(self.path))


def _stage(path: Path, state: dict[str, Any], pool: SnapshotPool | None) -> StagedWrite:
    """Validate, write `common.pt` (rank 0), snapshot into `pool` (if any) and plan: the steps with collectives.

    megatron's own writer is not used: it forks writer processes and starts a `spawn`
    multiprocessing Manager even for a synchronous save, which re-imports `__main__` (a hang
    without an `if __name__ == "__main__"` guard) and forks a process holding gloo/NCCL threads.
    """
    from megatron.core.dist_checkpointing.serialization import get_default_save_common_strategy
    from megatron.core.dist_checkpointing.state_dict_utils import save_preprocess
    from megatron.core.dist_checkpointing.strategies.torch import (
        MCoreSavePlanner,
        _replace_state_dict_keys_with_sharded_keys,
        mcore_to_pyt_state_dict,
    )
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint.utils import _DistWrapper

    # The check that the ranks' shards tile every tensor once: on one process, its own state dict does by construction.
    sharded, common = save_preprocess(state, validate_access_integrity=not _single_process())
    get_default_save_common_strategy().save_common(common, path)
    if pool is not None:
        pool.snapshot(path.name, sharded)
    sharded, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded, True)  # main replicas only
    pyt_state = mcore_to_pyt_state_dict(sharded, False)  # ShardedObjects become bytes here: a snapshot too
    # The caller fsyncs the tree once; no copy-ahead: the tensors are in CPU memory by now or are read as they lie.
    writer = FileSystemWriter(path, thread_count=1, sync_files=False, per_thread_copy_ahead=0)
    planner = MCoreSavePlanner(dedup_replicated_tensors=False, flatten_state_dict=False)
    dist = _DistWrapper(None, not _single_process(), 0)
    metadata = None

    def local_step():
        planner.set_up_planner(state_dict=pyt_state, storage_meta=writer.storage_meta(), is_coordinator=dist.is_coordinator)
        writer.set_up_storage_writer(dist.is_coordinator, rank=dist.rank, use_collectives=True)
        return writer.prepare_local_plan(planner.create_local_plan())

    def global_step(plans):
        nonlocal metadata
        plans, metadata = planner.create_global_plan(plans)
        return writer.prepare_global_plan(plans)

    plan = planner.finish_plan(dist.reduce_scatter("plan", local_step, global_step))
    return StagedWrite(Path(path), writer, planner, plan, metadata, dist)


class SnapshotPool:
    """CPU copies of what a save in the background writes, kept from one save to the next.

    Fresh memory costs more than the copy: first touch of 1 GB took ~0.5 s here against
    ~0.1 s to copy into touched memory, and pinned memory (a GPU's snapshot, copied without
    blocking the device) is slow to allocate. So buffers are reused by key; the price is one
    more copy of the saved state in host memory. Only one save may use the pool at a time.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple, torch.Tensor] = {}
        self._used: set[tuple] = set()
        self._device = False

    def snapshot(self, name: str, sharded: dict[str, Any]) -> None:
        """Point every sharded tensor of `sharded` at a copy of its data (`name` tells directories apart)."""
        from megatron.core.dist_checkpointing.dict_utils import nested_values
        from megatron.core.dist_checkpointing.mapping import ShardedTensor

        for entry in nested_values(sharded):
            if not isinstance(entry, ShardedTensor):
                continue
            data = entry.data
            flat = entry.flattened_range
            key = (name, entry.key, entry.global_offset, None if flat is None else (flat.start, flat.stop))
            buffer = self._buffers.get(key)
            if buffer is None or buffer.shape != data.shape or buffer.dtype != data.dtype:
                buffer = torch.empty(data.shape, dtype=data.dtype, pin_memory=data.device.type == "cuda")
                self._buffers[key] = buffer
            buffer.copy_(data, non_blocking=data.device.type == "cuda")
            self._device |= data.device.type == "cuda"
            self._used.add(key)
            entry.data = buffer

    def settle(self) -> None:
        """Wait for device copies; free what this save did not use (the shapes of an earlier save)."""
        if self._device:
            torch.cuda.synchronize()
        for key in set(self._buffers) - self._used:
            del self._buffers[key]
        self._used, self._device = set(), False


class DeferredWrites:
    """The sharded saves made inside `deferred_writes()`: staged there, written later by `write` and `finish`."""

    def __init__(self, pool: SnapshotPool) -> None:
        self.pool = pool
        self.staged: list[StagedWrite] = []

    def write(self) -> list[list]:
        """This rank's files of every staged directory; no collective (any thread)."""
        return [staged.write() for staged in self.staged]

    def finish(self, parts: list[list[list]]) -> None:
        """Rank 0, given every rank's `write()`: the metadata of every staged directory."""
        for i, staged in enumerate(self.staged):
            staged.finish([part[i] for part in parts])


_DEFERRED: ContextVar[DeferredWrites | None] = ContextVar("llmforge_deferred_writes", default=None)


@contextmanager
def deferred_writes(pool: SnapshotPool) -> Iterator[DeferredWrites]:
    """Within it, `save_sharded`/`write_sharded` snapshot into `pool` and plan, and write nothing yet.

    So a stage's `save` hook serves a save in the background unchanged: everything it saves
    is copied now, on the training thread, and written by the returned object later.
    """
    deferred = DeferredWrites(pool)
    token = _DEFERRED.set(deferred)
    try:
        yield deferred
    finally:
        _DEFERRED.reset(token)
        pool.settle()


def _single_process() -> bool:
    # One process has nobody to plan with: torch's checkpoint then skips its gather/scatter
    # rounds, each a gloo collective costing milliseconds even on a group of one.
    return torch.distributed.get_world_size() == 1


def _load_strategy(reader):
    """megatron's torch_dist load with llmforge's reader (`dcp_read.DirectReader`), told it runs alone when it does.

    On one process, a checkpoint whose shards are each one whole saved chunk (a resume at the
    layout it was saved at) is read straight into the shards, without megatron's translation
    to torch's sharded tensors or torch's load planning: for a small model those were a third
    of the load. Otherwise megatron builds its reader and calls `checkpoint.load_state_dict`
    (without `no_dist`, see `_single_process`) inside one method with no hook, so for the length
    of one load its module sees this reader and, on one process, a `checkpoint` that adds
    `no_dist` (and calls `load`, which torch has deprecated `load_state_dict` for).
    """
    from megatron.core.dist_checkpointing.strategies import torch as mcore_torch
    from torch.distributed import checkpoint as dcp

    class _Alone:
        def __getattr__(self, name: str):
            return getattr(dcp, name)

        @staticmethod
        def load_state_dict(state_dict, storage_reader, **kwargs):
            return dcp.load(state_dict, storage_reader=storage_reader, no_dist=True, **kwargs)

    class DirectLoad(mcore_torch.TorchDistLoadShardedStrategy):
        def load(self, sharded_state_dict, checkpoint_dir: Path):
            if _single_process():
                flat, flat_mapping, rename_mapping = mcore_torch._replace_state_dict_keys_with_sharded_keys(sharded_state_dict)
                read = reader.read_as_saved(flat)
                if read is not None:
                    loaded = mcore_torch._replace_sharded_keys_with_state_dict_keys(read, flat_mapping, rename_mapping)
                    mcore_torch._restore_dict_types(loaded, sharded_state_dict)
                    return loaded
            real = mcore_torch.checkpoint, mcore_torch._get_filesystem_reader
            mcore_torch._get_filesystem_reader = lambda path, cache_metadata=False: reader
            if _single_process():
                mcore_torch.checkpoint = _Alone()
            try:
                return super().load(sharded_state_dict, checkpoint_dir)
            finally:
                mcore_torch.checkpoint, mcore_torch._get_filesystem_reader = real

    return DirectLoad()


def _is_distributed_optimizer(optimizer) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return any(isinstance(inner, DistributedOptimizer) for inner in getattr(optimizer, "chained_optimizers", [optimizer]))


def _per_optimizer(convert: Callable[[Any], Any], state: Any, optimizer) -> Any:
    """`convert` applied to each chained optimizer's state (an MoE model's dense and expert ones: {0: ..., 1: ...})."""
    if len(getattr(optimizer, "chained_optimizers", ())) > 1:
        return {index: convert(inner) for index, inner in state.items()}
    return convert(state)


def model_sharded_state(model_chunks: list[torch.nn.Module], *, select: Callable[[str], bool] | None = None,
                        metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    """`{"chunk<i>": sharded state dict}`, optionally only the entries whose local name `select` keeps.

    Keys inside are global (layer offsets, TP slices); the chunk names only shape the dict.
    A finetune stage that trains adapters alone saves and loads just their entries.
    """
    metadata = _metadata() if metadata is None else metadata
    model = {}
    for i, chunk in enumerate(model_chunks):
        entries = unwrap(chunk).sharded_state_dict(metadata=metadata)
        model[f"chunk{i}"] = {k: v for k, v in entries.items() if select is None or select(k)}
    return model


# megatron's Float16OptimizerWithFloat16Params (`precision: bf16`) keeps the fp32 master weights as
# one list per param group. dist_checkpointing splits a list of lists holding an empty one (a
# frozen-base stage's empty no-decay group) into halves whose indices no longer match, and the
# load then fails to merge them; so the groups travel as {group index: list}.
_MASTER_GROUPS = "fp32_from_fp16_params"


def _master_groups_by_index(state: Any) -> Any:
    if isinstance(state, dict) and isinstance(state.get(_MASTER_GROUPS), list):
        state[_MASTER_GROUPS] = dict(enumerate(state[_MASTER_GROUPS]))
    return state


def _master_groups_as_list(state: Any) -> Any:
    if isinstance(state, dict) and isinstance(state.get(_MASTER_GROUPS), dict):
        groups = state[_MASTER_GROUPS]
        state[_MASTER_GROUPS] = [groups[i] for i in range(len(groups))]
    return state


def _sharded_state_dict(model_chunks: list[torch.nn.Module], optimizer, *, loading: bool,
                        select: Callable[[str], bool] | None = None) -> dict[str, Any]:
    metadata = _metadata()
    model = model_sharded_state(model_chunks, select=select, metadata=metadata)
    state = {"model": model}
    if optimizer is not None:
        state["optimizer"] = _per_optimizer(_master_groups_by_index, optimizer.sharded_state_dict(model, is_loading=loading, metadata=metadata),
                                            optimizer)
    return state


def write_sharded(path: str | Path, state: dict[str, Any]) -> None:
    """Save a sharded state dict the caller built (`{"model": ..., "common": ...}`) into `path` (a collective).

    Inside `deferred_writes()` it only stages the save (snapshot and plan); the files come later.
    """
    deferred = _DEFERRED.get()
    staged = _stage(Path(path), state, None if deferred is None else deferred.pool)
    if deferred is not None:
        deferred.staged.append(staged)
        return
    # As torch's checkpoint.save: each rank writes, rank 0 writes the metadata, every rank learns of any failure.
    staged.dist.all_reduce("write", staged.write, staged.finish)


def save_sharded(path: str | Path, model_chunks: list[torch.nn.Module], optimizer, common: dict[str, Any], *,
                 select: Callable[[str], bool] | None = None) -> None:
    """Save this rank's shards into the existing, empty directory `path` (a collective).

    Args:
        optimizer: the megatron optimizer from `wrap_optimizer`, or None for weights only.
        common: plain values (counters, scheduler state) written once, by rank 0;
            they must be the same on every rank.
        select: save only the model entries whose local name it keeps (see `model_sharded_state`).
    """
    state = _sharded_state_dict(model_chunks, optimizer, loading=False, select=select)
    state["common"] = common
    write_sharded(path, state)


def _check_same_precision(path: str | Path, model_state: dict[str, Any], metadata) -> None:
    """Refuse to resume an optimizer across precisions: its state (fp32 master weights or none) is
    shaped by the weights' dtype. Weights alone load across precisions (cast on load).

    Args:
        metadata: the checkpoint's torch_dist metadata (`.metadata`).
    """
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    saved = {key: entry.properties.dtype for key, entry in metadata.state_dict_metadata.items() if isinstance(entry, TensorStorageMetadata)}
    for entry in nested_values(model_state):
        if isinstance(entry, ShardedTensor) and entry.key in saved and saved[entry.key] != entry.data.dtype:
            written, wanted = str(saved[entry.key]).removeprefix("torch."), str(entry.data.dtype).removeprefix("torch.")
            raise UserError(f"{path} holds {written} weights, but this stage trains {wanted} ones: its optimizer state cannot "
                            "resume in another precision (precision: bf16 keeps bf16 weights and fp32 master weights; fp32 and "
                            "bf16-autocast keep fp32 weights; before issue 22, bf16 meant bf16-autocast)",
                            "resume at the precision the checkpoint was written at, or start a new stage from it with init_from "
                            "(weights load into either precision)")


def load_sharded(path: str | Path, model_chunks: list[torch.nn.Module], optimizer, *,
                 select: Callable[[str], bool] | None = None) -> dict[str, Any]:
    """Load `path` into this rank's chunks (and optimizer, unless None), in any layout; returns `common`.

    With `select`, only the selected entries are loaded and the rest of the model is left as it is.
    """
    from megatron.core import dist_checkpointing

    from llmforge.models import cpu_compat
    from llmforge.runtime.dcp_read import DirectReader

    if optimizer is not None and _is_distributed_optimizer(optimizer):
        cpu_compat.prepare_distributed_optimizer_for_load(optimizer)
    state = _sharded_state_dict(model_chunks, optimizer, loading=True, select=select)
    reader = DirectReader(path)  # reads `.metadata` once, for the check and the load
    if optimizer is not None:
        _check_same_precision(path, state["model"], reader.read_metadata())
    # As on save, no check that the ranks' shards tile each tensor on one process (an all_gather_object, on a group of one).
    loaded = dist_checkpointing.load(state, str(path), sharded_strategy=_load_strategy(reader), validate_access_integrity=not _single_process())
    for i, chunk in enumerate(model_chunks):
        # A rank whose selection is empty (a soft prompt lives on the first pipeline stage only)
        # gets nothing back for it; strict loads still refuse a missing entry below.
        entries = loaded.get("model", {}).get(f"chunk{i}", {})
        missing, unexpected = unwrap(chunk).load_state_dict(entries, strict=select is None)
        if select is not None and (unexpected or any(select(k) for k in missing)):
            raise RuntimeError(f"{path}: selected entries did not load: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if optimizer is not None:
        optimizer.load_state_dict(_per_optimizer(_master_groups_as_list, loaded["optimizer"], optimizer))
    return loaded.get("common", {})
