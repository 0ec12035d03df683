"""Does a stage fit its devices, and if not, the cheapest change that makes it fit.

"Cheapest" is the layout with the shortest estimated step time (`cost.step_time`) whose
largest rank fits, then the one that changes fewest settings. Only changes that lower
memory are tried, on the same number of devices: more tensor or pipeline parallelism,
sequence parallelism, the distributed optimizer, recompute, a smaller micro batch. When
none fits, the planner doubles the devices until one does.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import Any

from llmforge.plan.catalog import Device
from llmforge.plan.cost import StepTime, step_time
from llmforge.plan.memory import Layout, RankMemory

# Kept free of the device's memory for the CUDA context, NCCL buffers, allocator
# fragmentation and transient tensors the model does not count.
HEADROOM = 0.10
RECOMPUTE_ORDER = ("none", "selective", "full")
MAX_DEVICE_DOUBLINGS = 8
GPUS_PER_NODE = 8

# Layout field → the spec key that sets it ("{stage}" is the stage's index).
SPEC_KEYS = {
    "tensor": "parallelism.tensor_model_parallel_size",
    "pipeline": "parallelism.pipeline_model_parallel_size",
    "virtual": "parallelism.virtual_pipeline_model_parallel_size",
    "data": "parallelism.data_parallel_size",
    "sequence_parallel": "parallelism.sequence_parallel",
    "recompute": "parallelism.recompute_granularity",
    "distributed_optimizer": "parallelism.use_distributed_optimizer",
    "micro_batch_size": "stages.{stage}.train.micro_batch_size",
    "nnodes": "parallelism.nnodes",
    "nproc_per_node": "parallelism.nproc_per_node",
}


def usable_bytes_per_rank(device: Device, layout: Layout) -> int:
    """Memory one rank may plan for: the device's, less headroom, shared by a node's ranks on a CPU."""
    share = layout.nproc_per_node if device.shared_by_node else 1
    return int(device.memory_bytes * (1 - HEADROOM) / share)


@dataclass
class Evaluation:
    """A layout's largest rank and its estimated step time."""

    layout: Layout
    largest: RankMemory
    step: StepTime
    usable: int

    @property
    def fits(self) -> bool:
        return self.largest.total <= self.usable


def largest_rank(model: Any, layout: Layout, *, precision: str, optimizer: Any, seq_length: int, device: Device,
                 stage: Any = None, documents: tuple[bool, bool] = (False, False)) -> RankMemory:
    """The pipeline stage holding the most: the first (most micro batches in flight) or the last (logits)."""
    from llmforge.plan import finetune

    stages = {0, layout.pipeline - 1}
    ranks = [finetune.rank_memory(model, layout, s, stage=stage, precision=precision, optimizer=optimizer, seq_length=seq_length,
                                  device=device.kind, documents=documents) for s in sorted(stages)]
    return max(ranks, key=lambda r: r.total)


def evaluate(model: Any, layout: Layout, *, precision: str, optimizer: Any, seq_length: int, device: Device, mfu: float,
             stage: Any = None, documents: tuple[bool, bool] = (False, False)) -> Evaluation:
    return Evaluation(
        layout=layout,
        largest=largest_rank(model, layout, precision=precision, optimizer=optimizer, seq_length=seq_length, device=device,
                             stage=stage, documents=documents),
        step=step_time(model, layout, device, precision=precision, seq_length=seq_length, mfu=mfu, stage=stage),
        usable=usable_bytes_per_rank(device, layout),
    )


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _tensor_sizes(model: Any, layout: Layout) -> list[int]:
    """The current tensor-parallel size and the larger ones the model divides into within one node."""
    shape = (model.num_attention_heads, model.kv_groups, model.ffn, model.vocab_size)
    larger = {t for t in _divisors(layout.nproc_per_node) if t > layout.tensor and all(x % t == 0 for x in shape)}
    return sorted({layout.tensor} | larger)


def candidates(model: Any, layout: Layout, *, shardable_optimizer: bool) -> Iterator[Layout]:
    """Every valid layout on the same devices that uses no more memory per setting than `layout`."""
    world = layout.world_size
    recomputes = RECOMPUTE_ORDER[RECOMPUTE_ORDER.index(layout.recompute):]
    for tensor in _tensor_sizes(model, layout):
        for pipeline in (p for p in _divisors(model.num_layers) if p >= layout.pipeline and world % (tensor * p) == 0):
            data = world // (tensor * pipeline)
            if world % ((layout.expert_tensor or tensor) * layout.expert * pipeline):
                continue  # the experts' layout must tile the world too
            virtual = layout.virtual if pipeline > 1 and model.num_layers % (pipeline * layout.virtual) == 0 else 1
            # Sequence parallelism splits the sequence over the TP ranks, so it must divide evenly.
            sequence_parallel = (layout.sequence_parallel, True) if tensor > 1 and model.seq_length % tensor == 0 else (False,)
            distributed = (layout.distributed_optimizer, True) if shardable_optimizer and data > 1 else (layout.distributed_optimizer,)
            micro = [m for m in _divisors(layout.micro_batch_size) if layout.global_batch_size % (m * data) == 0]
            for sp, recompute, dist, mbs in itertools.product(sorted(set(sequence_parallel)), recomputes, sorted(set(distributed)), micro):
                yield layout.with_(tensor=tensor, pipeline=pipeline, virtual=virtual, data=data, sequence_parallel=sp,
                                   recompute=recompute, distributed_optimizer=dist, micro_batch_size=mbs)


def changes(before: Layout, after: Layout) -> list[tuple[str, Any, Any]]:
    """(layout field, old, new) for every setting that differs."""
    return [(f.name, getattr(before, f.name), getattr(after, f.name)) for f in fields(Layout)
            if getattr(before, f.name) != getattr(after, f.name)]


def _best(model: Any, layout: Layout, *, shardable_optimizer: bool, **kw: Any) -> Evaluation | None:
    best, best_key = None, None
    for candidate in candidates(model, layout, shardable_optimizer=shardable_optimizer):
        ev = evaluate(model, candidate, **kw)
        if not ev.fits:
            continue
        # Step times within 0.1% of each other tie; then fewer changes win.
        key = (round(math.log(max(ev.step.seconds, 1e-30)), 3), len(changes(layout, candidate)))
        if best_key is None or key < best_key:
            best, best_key = ev, key
    return best


def cheapest_fit(model: Any, layout: Layout, *, shardable_optimizer: bool, device: Device, **kw: Any) -> Evaluation | None:
    """The cheapest fitting layout: on the same devices if possible, else on the fewest doublings of them.

    GPUs fill a node (up to 8) before more nodes are added; CPU ranks share their
    machine's memory, so only more machines help them.
    """
    found = _best(model, layout, shardable_optimizer=shardable_optimizer, device=device, **kw)
    grown = layout
    for _ in range(MAX_DEVICE_DOUBLINGS):
        if found is not None:
            return found
        if not device.shared_by_node and grown.nnodes == 1 and grown.nproc_per_node < GPUS_PER_NODE:
            grown = grown.with_(nproc_per_node=grown.nproc_per_node * 2)
        else:
            grown = grown.with_(nnodes=grown.nnodes * 2)
        found = _best(model, grown, shardable_optimizer=shardable_optimizer, device=device, **kw)
    return found


def spec_overrides(before: Layout, after: Layout, *, stage_index: int, explicit_data_parallel: bool) -> list[str]:
    """The `KEY=VALUE` overrides that turn the spec's layout into `after`."""
    out = []
    for name, _, new in changes(before, after):
        if name == "data" and not explicit_data_parallel:
            continue  # `auto` follows the other sizes
        if name == "virtual":
            new = "null" if new == 1 else new
        elif isinstance(new, bool):
            new = str(new).lower()
        out.append(f"{SPEC_KEYS[name].format(stage=stage_index)}={new}")
    return out
