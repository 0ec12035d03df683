"""What a finetune stage holds, for `llmforge plan` (no torch): the stage as it runs, not full training.

- Every finetune stage trains on rows of its own length: `max_seq_length` (else the model's
  `seq_length`), plus the soft prompt's virtual tokens for prompt tuning. DPO and the reward
  model run a micro batch of m pairs as 2m rows (chosen, then rejected); the reward model's rows
  are L + 1 tokens long (it scores the last one).
- `lora` and `prompt_tuning` freeze the model: gradients (megatron's DDP buffer holds only what
  requires grad) and optimizer state, fp32 masters of bf16 adapters included, exist for the
  adapters or the soft prompt alone. The frozen weights are still held, and the activations
  are as large as full training's (megatron's linears save their input whether or not the
  weight trains), plus what each adapter saves.
- `dpo` holds a frozen reference model beside the policy; `rl` too when `kl_coef` > 0, plus a
  frozen reward model for each `reward_model` reward, and the KV cache its rollouts sample with:
  K and V of every layer for all of a replica's completions at once (`global_batch_size` / DP
  rows), at most the stage's L positions each, in the compute dtype.

The reference's scoring and the sampler's logits are transient and not counted.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from llmforge.models import size
from llmforge.plan.memory import (BF16, FP32, GRAD_BYTES, Layout, RankMemory, _adam_step_bytes, _norm_saved, _rms_normalized_kept, optimizer_state_bytes_per_param,
                                  rank_memory as full_rank_memory, residual_bytes, weight_bytes)

FROZEN_BASE = ("lora", "prompt_tuning")
PAIRS = ("dpo", "reward_model")


def sequence_length(model: Any, stage: Any) -> int:
    """Tokens per row the stage trains on."""
    length = getattr(stage, "max_seq_length", None) or model.seq_length
    if stage.type == "prompt_tuning":
        length += stage.prompt_tuning.num_virtual_tokens
    return row_length(stage, length)


def row_length(stage: Any, length: int) -> int:
    """The tokens a row of a stage of `length` (its inputs and their targets) puts through the model:
    a reward model's rows are one longer, since it scores the last token."""
    return length + (1 if getattr(stage, "type", None) == "reward_model" else 0)


def rows_layout(layout: Layout, stage: Any) -> Layout:
    """The layout with the rows one micro batch really runs (2 per pair)."""
    if stage is not None and stage.type in PAIRS:
        return layout.with_(micro_batch_size=2 * layout.micro_batch_size, global_batch_size=2 * layout.global_batch_size)
    return layout


def _lora_linears(model: Any, tensor: int) -> dict[str, tuple[int, int]]:
    """Target → (input, output features) of one layer's adapter on one TP rank: r · (in + out) parameters.

    Column-parallel (qkv, fc1): A [r, in] whole, B [out / tp, r]; row-parallel (proj, fc2): A [r, in / tp], B [out, r] whole.
    """
    hidden = model.hidden_size
    return {"linear_qkv": (hidden, size.qkv_width(model) // tensor), "linear_proj": (size.query_width(model) // tensor, hidden),
            "linear_fc1": (hidden, size.fc1_width(model) // tensor), "linear_fc2": (model.ffn // tensor, hidden)}


def lora_params_per_rank(model: Any, layout: Layout, lora: Any) -> list[int]:
    """Adapter parameters one TP rank of each pipeline stage holds."""
    shapes = _lora_linears(model, layout.tensor)
    per_layer = sum(lora.rank * (fan_in + fan_out) for target, (fan_in, fan_out) in shapes.items() if target in lora.target_modules)
    return [per_layer * model.num_layers // layout.pipeline] * layout.pipeline


def _lora_activations(model: Any, layout: Layout, lora: Any, seq: int, compute: int) -> int:
    """What each adapter saves in one micro batch: A's output (B's input) and, with dropout, its input and mask."""
    tokens = layout.micro_batch_size * seq
    shapes = _lora_linears(model, layout.tensor)
    per_layer = 0
    for target in lora.target_modules:
        fan_in, _ = shapes[target]
        per_layer += tokens * lora.rank * compute
        if lora.dropout > 0:
            per_layer += tokens * fan_in * (compute + 1)
    return per_layer * model.num_layers // layout.pipeline


def _frozen_base_savings(model: Any, layout: Layout, stage: Any, pipeline_stage: int, seq: int, precision: str,
                         device: str = "cuda") -> float:
    """What full training keeps that a frozen model does not, in one micro batch (measured: test_reality_finetune.py).

    Autograd keeps what only a weight's gradient needs just while that weight trains: an RMSNorm's
    normalized input, the token ids (the embedding's), the inputs of linears without an adapter
    and of the output layer. Under LoRA the embedding's output needs no gradient either, so the
    first norm keeps nothing; a soft prompt makes it need one.
    """
    tokens = layout.micro_batch_size * seq
    split = tokens / layout.tensor if layout.sequence_parallel else tokens
    h, res = model.hidden_size, residual_bytes(model, precision)
    compute = FP32 if precision == "fp32" else BF16
    layers = model.num_layers // layout.pipeline
    targets = set(stage.lora.target_modules) if stage.type == "lora" else set()
    # The CPU's RMSNorm keeps its normalized input for the weight's gradient; CUDA's fused one never keeps it.
    normalized = split * h * FP32 if model.normalization == "RMSNorm" and _rms_normalized_kept(device) else 0.0
    drop = 2 * layers * normalized
    # A norm's output feeds qkv or fc1; only an adapter keeps it, and with dropout it keeps its dropped copy instead.
    dropout = stage.type == "lora" and stage.lora.dropout > 0
    drop += layers * split * h * res * (("linear_qkv" not in targets or dropout) + ("linear_fc1" not in targets or dropout))
    if "linear_fc2" not in targets:
        drop += layers * tokens * model.ffn / layout.tensor * compute  # the MLP's product, fc2's input
    if pipeline_stage == 0:
        drop += tokens * 8
        if stage.type == "lora":
            drop += _norm_saved(model, split, res, device) - normalized
    if pipeline_stage == layout.pipeline - 1:
        drop += normalized + split * h * res
    return drop


def flops_per_token(model: Any, stage: Any, seq_length: int | None = None) -> float:
    """Model FLOPs per counted token of `stage`: what its MFU (plan and run alike) divides by the peak.

    Full training (pretrain, sft, reward_model) is 6·N + attention (`size.flops_per_token`). A
    frozen base (lora, prompt_tuning) computes no weight gradients, only the forward and the
    input gradients that reach the adapters or the soft prompt: 4·N, plus 6 per adapter parameter,
    plus attention (whose backward it still runs). dpo also runs the frozen reference's forward on
    every row the policy trains on: + 2·N and attention's forward. rl, per rollout token:
    `updates_per_rollout` policy updates, plus one forward each for sampling it (prefill or
    decode), the old policy's log-probs (with more than one update), the reference's (kl_coef >
    0) and every `reward_model` reward's score. Recompute is never counted (model FLOPs, not
    hardware FLOPs).
    """
    full = size.flops_per_token(model, seq_length)
    kind = getattr(stage, "type", None)
    if kind in FROZEN_BASE:
        adapters = 0
        if kind == "lora":
            shapes = _lora_linears(model, 1)
            adapters = model.num_layers * sum(stage.lora.rank * (fan_in + fan_out) for target, (fan_in, fan_out) in shapes.items()
                                              if target in stage.lora.target_modules)
        return full - 2.0 * size.matmul_params(model) + 6.0 * adapters
    forward = 2.0 * size.matmul_params(model) + size.attention_flops_per_token(model, seq_length) / 3
    if kind == "dpo":
        return full + forward
    if kind == "rl":
        forwards = (1 + (stage.updates_per_rollout > 1) + (stage.kl_coef > 0)
                    + sum(getattr(reward, "name", None) == "reward_model" for reward in stage.rewards))
        return stage.updates_per_rollout * full + forwards * forward
    return full


def trainable_per_rank(model: Any, layout: Layout, stage: Any) -> list[int] | None:
    """Parameters that train on each pipeline stage's rank; None when the whole model trains."""
    if stage is None or stage.type not in FROZEN_BASE:
        return None
    if stage.type == "lora":
        return lora_params_per_rank(model, layout, stage.lora)
    # The soft prompt lives with the embedding, on the first pipeline stage, whole on every TP rank.
    return [stage.prompt_tuning.num_virtual_tokens * model.hidden_size if s == 0 else 0 for s in range(layout.pipeline)]


def frozen_models(stage: Any) -> int:
    """Frozen copies of the model the stage holds beside the one it trains."""
    if stage is None:
        return 0
    if stage.type == "dpo":
        return 1
    if stage.type == "rl":
        return int(stage.kl_coef > 0) + sum(1 for r in stage.rewards if getattr(r, "name", None) == "reward_model")
    return 0


def kv_cache_bytes(model: Any, layout: Layout, stage: Any, precision: str) -> int:
    """An RL rollout's KV cache on one rank: all of a replica's completions, sampled together."""
    if stage is None or stage.type != "rl":
        return 0
    rows = stage.train.global_batch_size // layout.data
    length = sequence_length(model, stage)
    groups = max(1, model.kv_groups // layout.tensor)
    compute = FP32 if precision == "fp32" else BF16
    return 2 * (model.num_layers // layout.pipeline) * rows * length * groups * size.head_dim(model) * compute


def rank_memory(model: Any, layout: Layout, pipeline_stage: int, *, stage: Any, precision: str, optimizer: Any, seq_length: int | None = None,
                device: str = "cuda", documents: tuple[bool, bool] = (False, False)) -> RankMemory:
    """`memory.rank_memory` for the stage as it runs (the whole model trains when `stage` is None or pretrain/sft).

    `documents`: pretraining's (data.reset_attention_mask, data.reset_position_ids); a finetune stage's `packing` sets both."""
    if stage is not None and hasattr(stage, "max_seq_length"):  # every finetune stage: its own rows
        seq_length = sequence_length(model, stage)
    if getattr(stage, "packing", False):
        documents = (True, True)
    rows = rows_layout(layout, stage)
    full = full_rank_memory(model, rows, pipeline_stage, precision=precision, optimizer=optimizer, seq_length=seq_length, device=device,
                            documents=documents)
    trainable = trainable_per_rank(model, layout, stage)
    extra_frozen = frozen_models(stage) * full.weights
    if trainable is None:
        return replace(full, frozen_models=extra_frozen, kv_cache=kv_cache_bytes(model, layout, stage, precision))
    train = trainable[pipeline_stage]
    state_bytes, _ = optimizer_state_bytes_per_param(optimizer, precision=precision)
    sharded = layout.distributed_optimizer and getattr(optimizer, "name", "adamw") == "adamw"
    tensors = (2 * len(stage.lora.target_modules) * model.num_layers // layout.pipeline if stage.type == "lora"
               else int(pipeline_stage == 0))
    activations = full.activations - round(_frozen_base_savings(model, rows, stage, pipeline_stage, seq_length or model.seq_length,
                                                                precision, device))
    if stage.type == "lora":
        activations += _lora_activations(model, rows, stage.lora, seq_length or model.seq_length, FP32 if precision == "fp32" else BF16)
    return replace(full, params=full.params + train, weights=full.weights + train * weight_bytes(precision), gradients=train * GRAD_BYTES,
                   optimizer_states=(train * state_bytes + _adam_step_bytes(optimizer, tensors)) // (layout.data if sharded else 1),
                   activations=activations)


def checkpoint_bytes(model: Any, stage: Any, optimizer: Any, *, precision: str) -> int:
    """One checkpoint of the stage: LoRA and prompt tuning save what trains alone, with its optimizer state; with
    `lora.merge` the final one holds the merged model's weights too (that one is given, the largest)."""
    from llmforge.plan import cost

    if stage is None or stage.type not in FROZEN_BASE:
        return cost.checkpoint_bytes(model, optimizer, precision=precision)
    if stage.type == "lora":
        shapes = _lora_linears(model, 1)
        trainable = model.num_layers * sum(stage.lora.rank * (i + o) for t, (i, o) in shapes.items() if t in stage.lora.target_modules)
    else:
        trainable = stage.prompt_tuning.num_virtual_tokens * model.hidden_size
    state_bytes, _ = optimizer_state_bytes_per_param(optimizer, precision=precision)
    merged = size.param_count(model) * weight_bytes(precision) if stage.type == "lora" and stage.lora.merge else 0
    return trainable * (weight_bytes(precision) + state_bytes) + merged
