"""Raw sharded save and load of model and optimizer with megatron's dist_checkpointing.

Each tensor is saved under its global key and shape (`sharded_state_dict()`), so a
checkpoint written at one TP/PP/DP layout loads at another. Plain
`torch.distributed.checkpoint` on `state_dict()` silently drops TP shards (it records
local shapes as global). The atomic temp-dir, marker and retention layer is the caller's.
"""

from __future__ import annotations

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



def _sync_save_strategy():
    """megatron's torch_dist format, written synchronously by torch's FileSystemWriter.

    megatron's own writer forks worker processes and starts a `spawn` multiprocessing
    Manager even for a synchronous save; that re-imports `__main__` (a hang without an
    `if __name__ == "__main__"` guard) and forks a process that holds gloo/NCCL threads.
    """
    from megatron.core.dist_checkpointing.strategies.torch import (
        MCoreSavePlanner,
        TorchDistSaveShardedStrategy,
        _replace_state_dict_keys_with_sharded_keys,
        mcore_to_pyt_state_dict,
    )
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint import save as dcp_save

    class SyncTorchDistSave(TorchDistSaveShardedStrategy):
        def save(self, sharded_state_dict, checkpoint_dir: Path) -> None:
            sharded_state_dict, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, self.keep_only_main_replica)
            pyt_state_dict = mcore_to_pyt_state_dict(sharded_state_dict, False)
            dcp_save(
                pyt_state_dict,
                storage_writer=FileSystemWriter(checkpoint_dir, thread_count=1, sync_files=False),  # the caller fsyncs the tree once
                planner=MCoreSavePlanner(dedup_replicated_tensors=not self.keep_only_main_replica, flatten_state_dict=False),
                no_dist=_single_process(),
            )

    return SyncTorchDistSave("torch_dist", 1)


def _single_process() -> bool:
    # One process has nobody to plan with: torch's checkpoint then skips its gather/scatter
    # rounds, each a gloo collective costing milliseconds even on a group of one.
    return torch.distributed.get_world_size() == 1


def _load_strategy():
    """megatron's torch_dist load, told it runs alone when it does (see `_single_process`).

    megatron calls `checkpoint.load_state_dict` without `no_dist` and offers no hook, so for
    the length of one single-process load its module sees a `checkpoint` that adds it (and
    calls `load`, which torch has deprecated `load_state_dict` for).
    """
    from megatron.core.dist_checkpointing.strategies import torch as mcore_torch
    from torch.distributed import checkpoint as dcp

    class _Alone:
        def __getattr__(self, name: str):
            return getattr(dcp, name)

        @staticmethod
        def load_state_dict(state_dict, storage_reader, **kwargs):
            return dcp.load(state_dict, storage_reader=storage_reader, no_dist=True, **kwargs)

    class SingleProcessLoad(mcore_torch.TorchDistLoadShardedStrategy):
        def load(self, sharded_state_dict, checkpoint_dir: Path):
            real = mcore_torch.checkpoint
            mcore_torch.checkpoint = _Alone()
            try:
                return super().load(sharded_state_dict, checkpoint_dir)
            finally:
                mcore_torch.checkpoint = real

    return SingleProcessLoad() if _single_process() else None


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
    """Save a sharded state dict the caller built (`{"model": ..., "common": ...}`) into `path`."""
    from megatron.core import dist_checkpointing

    dist_checkpointing.save(state, str(path), sharded_strategy=_sync_save_strategy(), validate_access_integrity=True)


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


def _check_same_precision(path: str | Path, model_state: dict[str, Any]) -> None:
    """Refuse to resume an optimizer across precisions: its state (fp32 master weights or none) is
    shaped by the weights' dtype. Weights alone load across precisions (cast on load)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    saved = dist_checkpointing.load_tensors_metadata(str(path))
    for entry in nested_values(model_state):
        if isinstance(entry, ShardedTensor) and entry.key in saved and saved[entry.key].dtype != entry.data.dtype:
            written, wanted = str(saved[entry.key].dtype).removeprefix("torch."), str(entry.data.dtype).removeprefix("torch.")
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

    if optimizer is not None and _is_distributed_optimizer(optimizer):
        cpu_compat.prepare_distributed_optimizer_for_load(optimizer)
    state = _sharded_state_dict(model_chunks, optimizer, loading=True, select=select)
    if optimizer is not None:
        _check_same_precision(path, state["model"])
    loaded = dist_checkpointing.load(state, str(path), sharded_strategy=_load_strategy())
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
