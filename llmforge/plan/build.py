"""Assemble the plan of a validated spec: components, size, tokens, memory, fit and time.

The result is a plain JSON-ready dict (`llmforge plan --json` prints it as is; the console
report renders the same dict), so both views always agree.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from llmforge.models import size
from llmforge.plan import cost, finetune, fit
from llmforge.plan.budget import StageBudget, stage_budgets
from llmforge.plan.catalog import CATALOG, Device
from llmforge.plan.memory import Layout, optimizer_state_bytes_per_param
from llmforge.spec.errors import UserError

PLAN_VERSION = 1
_SHAPE = ("num_layers", "hidden_size", "num_attention_heads", "kv_groups", "ffn", "vocab_size", "seq_length")


def _sized(model: Any) -> bool:
    """Whether the planner can size this model (the built-in `gpt`, or a plugin with its shape)."""
    return all(hasattr(model, a) for a in _SHAPE)


def _layout_dict(layout: Layout) -> dict[str, Any]:
    return {
        "tensor_model_parallel_size": layout.tensor,
        "pipeline_model_parallel_size": layout.pipeline,
        "virtual_pipeline_model_parallel_size": layout.virtual if layout.virtual > 1 else None,
        "expert_model_parallel_size": layout.expert,
        "expert_tensor_parallel_size": layout.expert_tensor_parallel_size,
        "data_parallel_size": layout.data,
        "world_size": layout.world_size,
        "nnodes": layout.nnodes,
        "nproc_per_node": layout.nproc_per_node,
        "sequence_parallel": layout.sequence_parallel,
        "recompute_granularity": layout.recompute,
        "use_distributed_optimizer": layout.distributed_optimizer,
    }


def _fix(spec: Any, index: int, layout: Layout, found: fit.Evaluation | None) -> dict[str, Any] | None:
    if found is None:
        return None
    return {
        "overrides": fit.spec_overrides(layout, found.layout, stage_index=index,
                                        explicit_data_parallel=spec.parallelism.data_parallel_size != "auto"),
        "changes": [{"setting": fit.SPEC_KEYS[k].format(stage=index), "from": a, "to": b} for k, a, b in fit.changes(layout, found.layout)],
        "world_size": found.layout.world_size,
        "largest_total": found.largest.total,
        "usable_bytes_per_rank": found.usable,
        "step_time_s": found.step.seconds,
    }


def _training_stage(spec: Any, index: int, stage: Any, budget: StageBudget, device: Device, mfu: float) -> dict[str, Any]:
    model, train = spec.model, stage.train
    layout = Layout.from_spec(spec.parallelism, train)
    # A finetune stage is costed as it runs: its own row length, frozen weights, references (plan/finetune.py).
    seq = finetune.sequence_length(model, stage) if hasattr(stage, "max_seq_length") else model.seq_length
    # Pretraining's packed documents (data.reset_*); a finetune stage's `packing` is read from the stage.
    documents = (spec.data.reset_attention_mask, spec.data.reset_position_ids) if stage.type == "pretrain" else (False, False)
    kw = dict(precision=train.precision, optimizer=train.optimizer, seq_length=seq, device=device, stage=stage, documents=documents)
    ranks = [finetune.rank_memory(model, layout, s, stage=stage, precision=train.precision, optimizer=train.optimizer, seq_length=seq,
                                  device=device.kind, documents=documents) for s in range(layout.pipeline)]
    largest = max(ranks, key=lambda r: r.total)
    usable = fit.usable_bytes_per_rank(device, layout)
    fits = largest.total <= usable
    step = cost.step_time(model, finetune.rows_layout(layout, stage), device, precision=train.precision, seq_length=seq, mfu=mfu,
                          stage=stage)
    found = None if fits else fit.cheapest_fit(model, layout, shardable_optimizer=train.optimizer.name == "adamw", mfu=mfu, **kw)
    state_bytes, state_note = optimizer_state_bytes_per_param(train.optimizer, precision=train.precision)
    each = finetune.checkpoint_bytes(model, stage, train.optimizer, precision=train.precision)
    return {
        **budget.as_dict(),
        "precision": train.precision,
        "optimizer": {"name": train.optimizer.name, "state_bytes_per_param": state_bytes, "assumes": state_note},
        "num_microbatches": layout.num_microbatches,
        "memory_per_rank": [r.as_dict() for r in ranks],
        "largest_pipeline_stage": largest.pipeline_stage,
        "largest_total": largest.total,
        "usable_bytes_per_rank": usable,
        "fits": fits,
        "fix": _fix(spec, index, layout, found),
        "step_time_s": step.seconds,
        "step_time": step.as_dict(),
        "flops_per_token": finetune.flops_per_token(model, stage, seq),
        "tokens_per_s": budget.tokens_per_step / step.seconds if step.seconds else None,
        "total_time_s": None if budget.steps is None else budget.steps * step.seconds,
        "checkpoints": cost.checkpoint_schedule(budget.steps, spec.checkpoint.interval, spec.checkpoint.keep_last, each),
    }


def _components(spec: Any, registry: Any) -> dict[str, Any]:
    from llmforge.resolve import resolve

    resolved = resolve(spec, registry)
    return {"shared": resolved["components"], "stages": {s["name"]: s["components"] for s in resolved["stages"]}}


def _assumptions(device: Device, mfu: float, *, fp8: bool = False) -> list[str]:
    return [
        "precision: bf16 is megatron's mixed precision (Megatron-LM's --bf16): 2 B weight + 4 B fp32 gradient per parameter, "
        "plus fp32 master weights and optimizer state (AdamW 4 + 8 B); fp32 and bf16-autocast: 4 B weight + 4 B gradient, "
        "plus fp32 optimizer state (AdamW 8 B); the optimizer's bytes shard over data-parallel ranks with the distributed optimizer",
        "activations: Korthikanti et al. 2022 adapted to megatron's local layers with SDPA (no s² scores, no masks at dropout 0), "
        "matched to the tensors autograd saves; an upper bound for TransformerEngine layers, which keep bf16 norm inputs",
        "pipeline: 1F1B keeps pp − i micro batches in flight on stage i (interleaved: megatron's warm-up count)",
        f"fits: the largest rank must stay under {1 - fit.HEADROOM:.0%} of the device's memory "
        "(the rest: CUDA context, communication buffers, fragmentation)",
        f"time: {mfu:.0%} MFU (model FLOPs per second per device over one {device.name}'s dense peak"
        + ("; a rank's device is its share of the machine" if device.shared_by_node else "")
        + "); the pipeline bubble, recompute and "
        f"+{cost.TP_SLOWDOWN_PER_DOUBLING:.0%} per tensor-parallel doubling come on top",
        "FLOPs per token: 6·N + 6·L·h·s (N: the active parameters, an MoE layer's top-k experts, without the input "
        "embedding, with the output projection; causal attention)",
    ] + (["precision: fp8 keeps bf16 weights and fp32 masters as bf16 does, plus TE's FP8 copy and transpose of each layer "
          "weight (2 B per layer parameter); the layers' linear inputs are saved in FP8 (1 B); its time takes the layers' GEMMs "
          f"{cost.FP8_GEMM_SPEEDUP}× faster than bf16 (an assumption: ~1.3× end to end, as torchtitan and OLMo-core publish), "
          "and its MFU is over the bf16 peak"] if fp8 else [])


def build_plan(spec: Any, *, registry: Any, device: Device, run_dir: Path, spec_path: str, mfu: float | None = None) -> dict[str, Any]:
    """The plan of `spec` on `device`, as a JSON-ready dict."""
    mfu = device.mfu if mfu is None else mfu
    if not 0 < mfu <= 1:
        raise UserError(f"--mfu {mfu} is not a fraction of the peak", "give a value in (0, 1], e.g. --mfu 0.4")
    model = spec.model
    budgets = stage_budgets(spec, Path(run_dir))
    plan: dict[str, Any] = {
        "version": PLAN_VERSION,
        "spec": spec_path,
        "name": spec.name,
        "run_dir": str(run_dir),
        "device": {"name": device.name, "description": device.description, "memory_bytes": device.memory_bytes,
                   "peak_flops_bf16": device.peak_flops_bf16, "peak_flops_fp32": device.peak_flops_fp32,
                   "peak_flops_fp8": device.peak_flops_fp8,
                   "shared_by_node": device.shared_by_node},
        "mfu": mfu,
        "components": _components(spec, registry),
    }
    if not _sized(model):
        plan["note"] = f"model {model.name!r} does not expose the GPT shape, so size, memory and time are not planned"
        plan["stages"] = [b.as_dict() for b in budgets]
        return plan

    layout = Layout.from_spec(spec.parallelism)
    fp8 = [s.name for s in spec.stages if getattr(getattr(s, "train", None), "precision", None) == "fp8"]
    if fp8 and not device.peak_flops_fp8:
        with_fp8 = ", ".join(n for n, d in CATALOG.items() if d.peak_flops_fp8)
        raise UserError(f"stage {fp8[0]!r} trains in precision fp8, and {device.name} ({device.description}) has no FP8 matmuls",
                        f"plan it for a device that has them (--gpu {with_fp8}), or use precision: bf16")
    stages = []
    for index, (stage, budget) in enumerate(zip(spec.stages, budgets)):
        if getattr(stage, "train", None) is None:
            stages.append(budget.as_dict())
        else:
            stages.append(_training_stage(spec, index, stage, budget, device, mfu))
    training = [s for s in stages if "memory_per_rank" in s]
    heaviest = max(training, key=lambda s: s["largest_total"], default=None)
    times = [s["total_time_s"] for s in training]
    plan.update({
        "layout": _layout_dict(layout),
        "params_total": size.param_count(model),
        # What one token passes through: an MoE model's top-k experts; all of a dense model.
        "params_active": size.active_param_count(model),
        "params_per_rank": size.param_count_per_rank(model, layout),
        "matmul_params": size.matmul_params(model),
        "flops_per_token": size.flops_per_token(model),
        "memory_stage": heaviest["name"] if heaviest else None,
        "memory_per_rank": heaviest["memory_per_rank"] if heaviest else [],
        "largest_memory": ({"pipeline_stage": heaviest["largest_pipeline_stage"], "total": heaviest["largest_total"]}
                           if heaviest else None),
        "fits": all(s["fits"] for s in training),
        "total_time_s": None if any(t is None for t in times) else math.fsum(times),
        "stages": stages,
        "assumptions": _assumptions(device, mfu, fp8=any(s["precision"] == "fp8" for s in training)),
    })
    return plan

