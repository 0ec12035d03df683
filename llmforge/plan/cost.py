"""Step time and checkpoint cost of a stage, from FLOPs, the device's peak and an assumed MFU.

    step time = tokens per step × FLOPs per token × recompute factor
                / (devices × peak per device × MFU) × (1 + pipeline bubble) × tensor-parallel factor

MFU is the model-FLOPs utilization of the work itself, with one definition for the plan,
the train log, TensorBoard and the benchmarks (`model_flops_utilization`): model FLOPs per
second per device over one device's peak. The pipeline bubble, (pp − 1) / (micro batches ×
virtual chunks) of 1F1B, and recompute's extra forward FLOPs come on top, so the estimate
moves with the layout the way a real run does.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from llmforge.models import size
from llmforge.plan.catalog import Device
from llmforge.plan.memory import Layout, optimizer_state_bytes_per_param, weight_bytes

# Tensor parallelism adds all-reduces (or all-gathers and reduce-scatters with sequence
# parallelism) on the critical path of every layer; inside an NVLink node Megatron loses
# a few percent per doubling.
TP_SLOWDOWN_PER_DOUBLING = 0.05
# precision fp8: how much faster the transformer layers' GEMMs run than in bf16. Not the 2× of
# the FP8 peak: quantizing inputs, amax reductions and scale updates add work around each GEMM.
# 1.5× on the GEMMs gives the ~1.3× end-to-end gain torchtitan and OLMo-core publish for
# Llama-3 8B-class models on H100 (attention, norms and the output layer stay bf16). An
# assumption until benchmarks/gpu_check.py measures it on a machine with TransformerEngine.
FP8_GEMM_SPEEDUP = 1.5


@dataclass
class StepTime:
    seconds: float
    compute_seconds: float
    bubble_fraction: float
    recompute_factor: float
    tensor_parallel_factor: float
    fp8_factor: float = 1.0  # precision fp8: step time over bf16's (FP8_GEMM_SPEEDUP on the layers' GEMMs)

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def recompute_factor(model: Any, recompute: str, seq_length: int) -> float:
    """Hardware FLOPs over model FLOPs: recompute repeats part of the forward pass."""
    model_flops = size.flops_per_token(model, seq_length)
    attention_forward = size.attention_flops_per_token(model, seq_length) / 3
    if recompute == "selective":
        return (model_flops + attention_forward) / model_flops
    if recompute == "full":
        layers_forward = 2.0 * sum(size.layer_params(model, layer=i, active=True) for i in range(model.num_layers)) + attention_forward
        return (model_flops + layers_forward) / model_flops
    return 1.0


def fp8_factor(model: Any, seq_length: int) -> float:
    """Compute time under fp8 over bf16's: the layers' GEMM FLOPs at FP8_GEMM_SPEEDUP, the rest unchanged."""
    total = size.flops_per_token(model, seq_length)
    layers = 6.0 * sum(size.layer_params(model, layer=i, active=True) for i in range(model.num_layers))
    return (total - layers + layers / FP8_GEMM_SPEEDUP) / total


def model_flops_utilization(tokens_per_s: float, flops_per_token: float, *, world_size: int, peak_flops: float) -> float:
    """MFU: model FLOPs per second per device over one device's peak.

    Args:
        tokens_per_s: the whole job's tokens per second (every DP rank's together).
        world_size: the processes that share the work (each one device, or one share of a CPU).
        peak_flops: one device's peak FLOP/s (`device_peak`; at run time `runtime.device.peak_flops`).
    """
    return tokens_per_s * flops_per_token / (world_size * peak_flops)


def device_peak(device: Device, layout: Layout, precision: str) -> float:
    """Peak FLOP/s of one rank's device: its GPU, or on the CPU its share of the machine."""
    share = layout.nproc_per_node if device.shared_by_node else 1
    return device.peak_flops(precision) / share


def step_time(model: Any, layout: Layout, device: Device, *, precision: str, seq_length: int, mfu: float, stage: Any = None) -> StepTime:
    from llmforge.plan.finetune import flops_per_token

    tokens = layout.global_batch_size * seq_length
    # The time at which model_flops_utilization(tokens / compute, ...) equals the assumed MFU; a
    # finetune stage's FLOPs per token are its own (frozen weights, a reference's forward).
    compute = tokens * flops_per_token(model, stage, seq_length) / (layout.world_size * device_peak(device, layout, precision) * mfu)
    factor = recompute_factor(model, layout.recompute, seq_length)
    bubble = (layout.pipeline - 1) / (layout.num_microbatches * layout.virtual)
    tp = 1.0 + TP_SLOWDOWN_PER_DOUBLING * math.log2(layout.tensor)
    fp8 = fp8_factor(model, seq_length) if precision == "fp8" else 1.0
    compute *= fp8
    return StepTime(compute * factor * (1 + bubble) * tp, compute, bubble, factor, tp, fp8)


def checkpoint_bytes(model: Any, optimizer: Any, *, precision: str) -> int:
    """One checkpoint: the weights (bf16 or fp32) plus the optimizer's fp32 states and master weights, each parameter once."""
    state_bytes, _ = optimizer_state_bytes_per_param(optimizer, precision=precision)
    return size.param_count(model) * (weight_bytes(precision) + state_bytes)


def checkpoint_schedule(steps: int | None, interval: int | None, keep_last: int, each_bytes: int) -> dict[str, Any]:
    """When a stage saves, how many saves it makes, and the disk it needs at most.

    The loop saves every `interval` steps and at the end; old checkpoints are pruned only
    after a new one is complete, so keep_last + 1 exist for a moment.
    """
    saves = None if steps is None else (math.ceil(steps / interval) if interval else 1)
    kept = None if saves is None else min(saves, keep_last + 1)
    return {
        "interval_steps": interval,
        "saves": saves,
        "keep_last": keep_last,
        "bytes_each": each_bytes,
        "disk_bytes": None if kept is None else kept * each_bytes,
    }
