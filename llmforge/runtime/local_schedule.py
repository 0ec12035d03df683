"""One process's step: megatron's no-pipelining schedule and grad handling, without their machinery.

When a run is one process (no DP, TP, PP or EP to talk to) with fp32 parameters on the CPU
layer, megatron's `forward_backward_no_pipelining`, `finalize_model_grads` and DDP's grad
buffer come down to: forward each micro batch, sum its loss, backward it, and scale the
grads by 1/tokens. Their machinery around that costs, at nanoGPT's shakespeare-char shape
(issue 31, docs/performance.md), ~1% of a step in Python (per micro batch set_input_tensor,
model-attribute walks, timer checks; per step DDP's finish/all-reduce calls and the
embedding and SP-norm passes over groups of one) and ~0.7% in memory passes over the grads
(zeroing DDP's buffer, autograd adding into it in place, the optimizer walks that find them).

`LocalStep` does the same arithmetic in the same order with the grads autograd hands over
(`param.grad`, never zeroed or added into: the first micro batch's grad *is* the sum so far),
so grads, losses and updates are bitwise those of megatron's path
(tests/unit/runtime/test_local_schedule.py). DDP's grad buffer, which would hold a second copy
of the grads, has its memory released at the first step: the buffer, its buckets and the parameters drop
their views of it, and DDP's methods that would use it raise and say why. Where
anything needs megatron's own, `local_refusal` says why and TrainStep calls megatron's.
`LLMFORGE_LOCAL_SCHEDULE=0` turns it off for a process.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch

ENABLED = os.environ.get("LLMFORGE_LOCAL_SCHEDULE", "1") != "0"

# TransformerConfig switches under which megatron's schedule does more than forward, backward
# and the 1/tokens scale: MoE and MTP auxiliary-loss scaling, loss scaling, overlapped or
# hybrid-CP schedules, activation offloading, FP8/FP4 first-micro-batch caches, timers.
_CONFIG_OFF = ("num_moe_experts", "mtp_num_layers", "grad_scale_func", "overlap_moe_expert_parallel_comm",
               "hybrid_context_parallel", "fine_grained_activation_offloading", "fp8", "fp4", "enable_autocast",
               "moe_router_enable_expert_bias", "timers")


def local_refusal(chunks: list[torch.nn.Module], optimizer: Any, config: Any, world_size: int) -> str | None:
    """Why a step over `chunks` needs megatron's schedule and grad buffers (None: `LocalStep` computes the same)."""
    from megatron.core.optimizer.optimizer import FP32Optimizer

    if not ENABLED:
        return "LLMFORGE_LOCAL_SCHEDULE=0"
    if world_size != 1:
        return "more than one process"
    if len(chunks) != 1:
        return "virtual pipeline chunks"
    # optim._grads_in_place: the CPU layer, no DP or expert DP, fp32 trainable parameters and no
    # DistributedOptimizer, so DDP's buffer holds the grads as autograd sums them, reduced over nothing.
    if not getattr(chunks[0], "grads_in_place", False):
        return "grads reduced over DP, bf16 parameters or a GPU"
    # Its prepare_grads only points param.grad at main_grad, and its step only steps the torch optimizer.
    if type(optimizer) is not FP32Optimizer:
        return f"megatron's {type(optimizer).__name__}"
    if not config.calculate_per_token_loss:
        return "a per-micro-batch loss average"
    if any(getattr(config, name, None) for name in _CONFIG_OFF):
        return "a config switch only megatron's schedule handles"
    if getattr(config, "cuda_graph_impl", "none") not in ("none", None):
        return "CUDA graphs"
    return None


def _released(name: str, *args, **kwargs):
    raise RuntimeError(f"DDP.{name}: this chunk's grad buffers were released by the one-process step "
                       "(runtime/local_schedule.py), which keeps the grads in param.grad; set LLMFORGE_LOCAL_SCHEDULE=0 "
                       "to train through megatron's schedule and buffers")


class LocalStep:
    """The schedule and grads of one process's step (`local_refusal` found nothing against it)."""

    def __init__(self, chunk: torch.nn.Module, optimizer: Any):
        from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
        from megatron.core.transformer.module import param_is_not_shared

        self.chunk, self.optimizer = chunk, optimizer
        self._buffers_released = False
        self.params = list(optimizer.get_parameters())  # the order megatron's optimizer walks them in
        # get_main_grads_for_grad_norm's filter, fixed for the run: each shared or TP-duplicate
        # parameter counts once.
        self.norm_params = [p for p in self.params
                            if param_is_not_shared(p) and param_is_not_tensor_parallel_duplicate(p, getattr(optimizer, "tp_group", None))]

    def clear(self) -> None:
        """Drop the last step's grads: autograd then hands the first micro batch's over as they are."""
        if not self._buffers_released:
            self._release_buffers()
        for param in self.params:
            param.grad = None

    def prepare(self) -> None:
        """Nothing: the grads are ready in param.grad (FP32Optimizer's prepare_grads would point it back at the released buffer)."""

    def discard(self) -> None:
        """A vetoed update's grads go."""
        self.optimizer.zero_grad()

    def _release_buffers(self) -> None:
        """Free DDP's grad buffers (fp32, one parameter's worth each): this step never uses them.
        At the first step, not at construction, so that a step built here can still be handed to
        megatron's path before it trains (the parity tests do)."""
        # Every view of the buffer's storage goes (the buffer's, its buckets', the parameters'
        # main_grad), so the memory is freed by reference counting: whatever still held one would
        # keep it alive rather than read freed memory.
        for buffer in [*self.chunk.buffers, *self.chunk.expert_parallel_buffers]:
            empty = buffer.grad_data.new_empty(0)
            buffer.grad_data = empty
            for bucket in buffer.buckets:
                bucket.grad_data = empty
        for param in self.chunk.module.parameters():
            if hasattr(param, "main_grad"):
                del param.main_grad
        for name in ("zero_grad_buffer", "scale_gradients", "start_grad_sync", "finish_grad_sync"):
            setattr(self.chunk, name, functools.partial(_released, name))
        self._buffers_released = True

    def grads(self) -> list[torch.Tensor]:
        """Every trainable parameter's grad; one that got none is zero, as in DDP's zeroed buffer
        (the optimizer still steps it: weight decay and momenta)."""
        for param in self.params:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
        return [param.grad for param in self.params]

    def norm_grads(self) -> list[torch.Tensor]:
        return [param.grad for param in self.norm_params]

    def run(self, forward_step: Callable[[Iterator, torch.nn.Module], tuple], items: list, *, forward_only: bool) -> list:
        """megatron's `forward_backward_no_pipelining` + `finalize_model_grads` over the micro batches.

        `forward_step(iterator, model)` → (output, loss_func) and `loss_func(output)` → (loss sum,
        token count, reported) are TrainStep's, called as megatron's schedule calls them. Returns
        the reported values per micro batch; in training the grads end scaled by 1 / (all micro
        batches' tokens), as finalize_model_grads leaves them.
        """
        reported = []
        total_tokens = torch.zeros([], dtype=torch.int)  # megatron's counter: an int tensor, summed in order
        iterator = iter(items)
        for _ in range(len(items)):
            output, loss_func = forward_step(iterator, self.chunk)
            loss, num_tokens, report = loss_func(output)
            reported.append(report)
            total_tokens += num_tokens
            if not forward_only and loss.requires_grad:
                torch.autograd.backward(loss)
        if not forward_only:
            grads = self.grads()
            if total_tokens > 0:
                # finalize_model_grads' own factor: 1.0 / an int tensor is an fp32 tensor, and
                # multiplying by it rounds as DDP's buffer multiply does.
                torch._foreach_mul_(grads, 1.0 / total_tokens)
        return reported
