"""LoRA adapters on megatron's column- and row-parallel linears, correct at any TP size.

y = W x + (α / r) B A x, with W frozen. Each adapter is a child of the attention or MLP
module that holds its linear (`self_attention.lora_linear_qkv`), so megatron's own
sharded-state-dict walk gives it global checkpoint keys with the layer offsets, and a
forward hook on the linear adds its output. Under tensor parallelism:

- column-parallel W (qkv, fc1): A [r, in] is replicated, B [out/tp, r] is split like W.
  The gradient of A needs every rank's B, so A x passes a copy-to-TP region (its backward
  all-reduces); under sequence parallelism x is gathered instead, and A's partial grads
  are summed by megatron as for the SP norms (`sequence_parallel` tag).
- row-parallel W (proj, fc2): A [r, in/tp] is split like W, B [out, r] is replicated; the
  partial A x are all-reduced (or reduce-scattered under SP, B then tagged) before B.

A starts layout-invariantly (a full draw from (seed, global name), then sliced) and B at
zero, so the adapted model starts as the base model, at every layout. Adapters take their
linear's dtype: bf16 under megatron's bf16 (the optimizer keeps their fp32 masters).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

TARGETS = {"linear_qkv": ("self_attention", "column"), "linear_proj": ("self_attention", "row"),
           "linear_fc1": ("mlp", "column"), "linear_fc2": ("mlp", "row")}
PREFIX = "lora_"


def is_adapter_key(name: str) -> bool:
    """A state-dict or checkpoint entry that belongs to a LoRA adapter."""
    return f".{PREFIX}" in name


class LoRAAdapter(torch.nn.Module):
    """The low-rank update of one megatron linear; called by a hook with the linear's input."""

    def __init__(self, linear: torch.nn.Module, *, kind: str, rank: int, alpha: float, dropout: float, gated: bool,
                 seed: int, name: str, expert: bool = False):
        from megatron.core import parallel_state
        from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

        super().__init__()
        self.kind, self.rank, self.scale, self.gated = kind, rank, alpha / rank, gated
        self.dropout, self.expert = dropout, expert
        self.sequence_parallel = bool(getattr(linear, "sequence_parallel", False)) and not expert
        # A routed expert's linear is whole on its rank (expert_tensor_parallel_size 1: layout_problems), whatever TP is.
        self.tp_size = 1 if expert else parallel_state.get_tensor_model_parallel_world_size()
        tp_rank = 0 if expert else parallel_state.get_tensor_model_parallel_rank()
        out_local, in_local = linear.weight.shape
        in_full = in_local * (self.tp_size if kind == "row" else 1)
        weight = linear.weight
        full_a = _draw(rank, in_full, seed=seed, name=name)
        if kind == "row":
            full_a = full_a[:, tp_rank * in_local:(tp_rank + 1) * in_local]
        self.A = torch.nn.Parameter(full_a.to(device=weight.device, dtype=weight.dtype).contiguous())
        self.B = torch.nn.Parameter(torch.zeros(out_local, rank, device=weight.device, dtype=weight.dtype))
        split, replicated = (self.B, self.A) if kind == "column" else (self.A, self.B)
        set_tensor_model_parallel_attributes(split, not expert, 0 if kind == "column" else 1, 1)
        if expert:  # reduced over the expert-data-parallel group, as the expert's own weights (models.moe)
            self.A.allreduce = self.B.allreduce = False
        # Under SP the replicated factor sees a different slice of the work on each TP rank.
        replicated.sequence_parallel = self.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from megatron.core import tensor_parallel as tp

        if self.dropout and self.training:
            # A sequence or feature shard differs per TP rank, so its mask comes from the TP fork.
            sharded = self.kind == "row" or self.sequence_parallel
            with tp.get_cuda_rng_tracker().fork() if sharded else contextlib.nullcontext():
                x = F.dropout(x, p=self.dropout)
        if self.kind == "column":
            if self.sequence_parallel:
                x = tp.gather_from_sequence_parallel_region(x)
            h = F.linear(x, self.A)
            if not self.sequence_parallel and not self.expert:
                h = tp.copy_to_tensor_model_parallel_region(h)
        else:
            h = F.linear(x, self.A)
            if self.sequence_parallel:
                h = tp.reduce_scatter_to_sequence_parallel_region(h)
            elif not self.expert:
                h = tp.reduce_from_tensor_model_parallel_region(h)
        return F.linear(h, self.B) * self.scale

    def delta_weight(self) -> torch.Tensor:
        """This rank's shard of (α / r) B A in fp32 (bf16 adapters too), laid out like the linear's local weight."""
        return (self.B.float() @ self.A.float()) * self.scale

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None) -> dict:
        from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        axis = {} if self.expert else {"B": 0} if self.kind == "column" else {"A": 1}
        entries = make_sharded_tensors_for_checkpoint({"A": self.A, "B": self.B}, prefix, axis, sharded_offsets)
        if self.gated:
            # fc1's local rows are [gate shard; up shard]: saved as two halves, as megatron saves fc1.
            entries[f"{prefix}B"] = apply_swiglu_sharded_factory(entries[f"{prefix}B"], sharded_offsets)
        return entries


def _draw(rows: int, cols: int, *, seed: int, name: str) -> torch.Tensor:
    """Kaiming-uniform A (as PEFT), from a generator keyed by (seed, global name): equal in every layout."""
    key = int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little")
    generator = torch.Generator().manual_seed(key)
    bound = 1.0 / math.sqrt(cols)
    return (torch.rand(rows, cols, generator=generator, dtype=torch.float64) * 2 - 1).mul(bound).float()


@dataclass
class Attached:
    linear: torch.nn.Module
    adapter: LoRAAdapter
    hook: torch.utils.hooks.RemovableHandle


def _add_delta(adapter: LoRAAdapter):
    def hook(module, args, output):
        out, bias = output
        return out + adapter(args[0]).to(out.dtype), bias

    return hook


def attach_lora(model_chunks: list[torch.nn.Module], *, targets: list[str], rank: int, alpha: float, dropout: float,
                seed: int) -> list[Attached]:
    """Freeze every parameter of the chunks and add trainable adapters on the `targets` linears."""
    from llmforge.models.init import global_name, unwrap

    attached = []
    for chunk in model_chunks:
        model = unwrap(chunk)
        for param in model.parameters():
            param.requires_grad_(False)
        for index, layer in enumerate(model.decoder.layers):
            for target in targets:
                holder_name, kind = TARGETS[target]
                for path, holder, expert in _holders(layer, holder_name):
                    linear = getattr(holder, target)
                    name = global_name(model, f"decoder.layers.{index}.{path}.{target}")
                    gated = target == "linear_fc1" and model.config.gated_linear_unit
                    adapter = LoRAAdapter(linear, kind=kind, rank=rank, alpha=alpha, dropout=dropout, gated=gated, seed=seed, name=name,
                                          expert=expert)
                    holder.add_module(f"{PREFIX}{target}", adapter)
                    attached.append(Attached(linear, adapter, linear.register_forward_hook(_add_delta(adapter))))
    return attached


def _holders(layer: torch.nn.Module, holder_name: str) -> list[tuple[str, torch.nn.Module, bool]]:
    """(path in the layer, module, is a routed expert) of each module holding a target linear: the attention or
    dense MLP itself; in an MoE layer, every local routed expert (megatron's SequentialMLP: one MLP each) and the shared expert."""
    holder = getattr(layer, holder_name)
    experts = getattr(holder, "experts", None)
    if experts is None:
        return [(holder_name, holder, False)]
    out = [(f"{holder_name}.experts.local_experts.{j}", expert, True) for j, expert in enumerate(experts.local_experts)]
    if getattr(holder, "shared_experts", None) is not None:
        out.append((f"{holder_name}.shared_experts", holder.shared_experts, False))
    return out


def adapters(model_chunks: list[torch.nn.Module]) -> Iterator[tuple[torch.nn.Module, LoRAAdapter]]:
    """(adapted linear, its adapter) for every adapter in the chunks."""
    from llmforge.models.init import unwrap

    for chunk in model_chunks:
        for module in unwrap(chunk).modules():
            for child_name, child in module.named_children():
                if isinstance(child, LoRAAdapter):
                    yield getattr(module, child_name[len(PREFIX):]), child


def merge(weight: torch.Tensor, adapter: LoRAAdapter) -> torch.Tensor:
    """W + (α / r) B A, summed in fp32 and rounded once to W's dtype."""
    return (weight.float() + adapter.delta_weight().detach()).to(weight.dtype)


def merged_state(model_chunks: list[torch.nn.Module]) -> dict[str, dict]:
    """The chunks' sharded state with the adapters folded in: W + (α / r) B A, no adapter entries.

    Nothing in the model changes: the merged weights are new tensors put into the state dict,
    so the result loads into a plain model (`init_from`, `llmforge export hf`).
    """
    import dataclasses

    from llmforge.runtime.sharded_io import model_sharded_state

    merged = {id(linear.weight): merge(linear.weight.detach(), adapter) for linear, adapter in adapters(model_chunks)}
    state = model_sharded_state(model_chunks, select=lambda key: not is_adapter_key(key))
    found = 0
    for chunk_state in state.values():
        for key, entry in list(chunk_state.items()):
            if id(getattr(entry, "data", None)) in merged:
                chunk_state[key] = dataclasses.replace(entry, data=merged[id(entry.data)])
                found += 1
    if found != len(merged):
        raise RuntimeError(f"merging LoRA: {len(merged)} adapted weights, {found} found in the model's state dict")
    return state
