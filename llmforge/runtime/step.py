"""One optimizer step over a global batch: megatron's pipeline schedule, grad checks, the update.

The hot path of training. Per step it costs megatron's own collectives (DP grad reduce,
token count, tied-embedding and SP-norm grads) plus one all-reduce of three numbers
(loss sum, token count, squared grad norm) and one host sync, which every rank uses to
agree on the loss and on whether the step is finite.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import torch
import torch.distributed as dist

from llmforge.runtime import host_collectives
from llmforge.runtime.faults import fault_point
from llmforge.runtime.local_schedule import LocalStep, local_refusal
from llmforge.spec.errors import UserError

if TYPE_CHECKING:
    from llmforge.runtime.distributed import ParallelContext
    from llmforge.runtime.documents import Documents


def autocast(precision: str, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """A context factory: bf16 autocast over fp32 parameters for `bf16-autocast`, else nothing (fp32,
    and megatron's `bf16`, whose parameters are bf16 already). Every forward (training, scoring,
    sampling) runs under this one, so they compute alike."""
    if precision == "bf16-autocast":
        return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def serving_context(precision: str, device: torch.device, chunks: Sequence[torch.nn.Module]) -> Callable[[], contextlib.AbstractContextManager]:
    """The context ModelServer's forwards run under: the stage's `autocast`, and under `fp8`
    bf16 matmuls. Generation and scoring feed TE shapes FP8 GEMMs refuse (one decoded token per
    row, prompts of any length), and what they report should be the weights' own answers, the
    bf16 weights an export writes; megatron's TransformerBlock reads `config.fp8` per forward."""
    if precision != "fp8":
        return autocast(precision, device)
    from megatron.core.utils import get_model_config

    config = get_model_config(chunks[0])

    @contextlib.contextmanager
    def without_fp8():
        saved, config.fp8 = config.fp8, None
        try:
            yield
        finally:
            config.fp8 = saved

    return without_fp8


@contextlib.contextmanager
def eval_mode(chunks: Sequence[torch.nn.Module]) -> Iterator[None]:
    """The chunks in eval mode inside, each in the mode it was in after. Only chunks in training mode are
    switched: `eval()` and `train()` walk every module (~0.3 ms each on a 4-layer model)."""
    training = [chunk for chunk in chunks if chunk.training]
    for chunk in training:
        chunk.eval()
    try:
        yield
    finally:
        for chunk in training:
            chunk.train()


@dataclass(frozen=True)
class StepResult:
    """What one step did. `loss` is the mean per target token over the whole global batch."""

    loss: float
    grad_norm: float
    nonfinite: bool
    num_tokens: int
    applied: bool = True  # False when the update was vetoed (non-finite, or by `update_guard`)


MicroBatch = torch.Tensor  # LongTensor [micro_batch_size, seq_length + 1]


@dataclass
class _Packed:
    """A micro batch's loss mask and, for packed finetune rows, its segments: moved to the device with the tokens."""

    mask: torch.Tensor | None
    segments: torch.Tensor | None


class MegatronGrads:
    """megatron's schedule, DDP's grad buffers and the optimizer's grad walks, at every layout:
    what `LocalStep` stands in for in one process, with the same methods."""

    def __init__(self, step: TrainStep) -> None:
        self.step = step
        self.in_place = [p for chunk in step.chunks if getattr(chunk, "grads_in_place", False)
                         for p in chunk.module.parameters() if p.requires_grad]

    def clear(self) -> None:
        for chunk in self.step.chunks:
            chunk.zero_grad_buffer()
        self.step.optimizer.zero_grad()
        for param in self.in_place:
            param.grad = param.main_grad  # autograd adds into it (cpu_compat.hookless_ddp)

    def prepare(self) -> None:
        self.step.optimizer.prepare_grads()

    def discard(self) -> None:
        """A vetoed update's grads go."""
        self.step.optimizer.zero_grad()
        for chunk in self.step.chunks:
            chunk.zero_grad_buffer()

    def grads(self) -> list[torch.Tensor]:
        return [p.grad for inner in self.step._optimizers for p in inner.get_parameters() if p.grad is not None]

    def norm_grads(self) -> list[torch.Tensor]:
        return [grad for inner in self.step._norm_optimizers for grad in inner.get_main_grads_for_grad_norm()]

    def run(self, forward_step: Callable, items: list, *, forward_only: bool) -> list:
        step = self.step
        # Each VPP chunk walks the micro batches once, so each gets its own iterator.
        return step._forward_backward(
            forward_step_func=forward_step,
            data_iterator=[iter(items) for _ in step.chunks],
            model=step.chunks,
            num_microbatches=len(items),
            seq_length=step.schedule_seq_length,
            micro_batch_size=step.micro_batch_size,
            forward_only=forward_only,
        )


class TrainStep:
    """Runs forward, backward and the optimizer update for a list of micro batches.

    Args:
        model_chunks: this rank's chunks, wrapped in megatron DDP by `wrap_optimizer`.
        optimizer: the megatron optimizer from `wrap_optimizer`.
        precision: "fp32"; "bf16" (megatron's mixed precision: the chunks' parameters are bf16,
            the optimizer's master weights fp32); or "bf16-autocast" (autocast over fp32 parameters).
        clip_grad: clip the global grad norm to this value; None or 0 = no clipping.
        documents: packed documents that do not see each other (block-causal attention,
            position resets, no loss across a boundary); None = one causal sequence per row.
    """

    def __init__(
        self,
        model_chunks: list[torch.nn.Module],
        optimizer,
        *,
        parallelism_ctx: ParallelContext,
        seq_length: int,
        micro_batch_size: int,
        precision: str,
        clip_grad: float | None,
        documents: Documents | None = None,
    ):
        from megatron.core.distributed import finalize_model_grads
        from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
        from megatron.core.pipeline_parallel import get_forward_backward_func
        from megatron.core.utils import get_model_config
        from llmforge.models.gpt import PRECISIONS

        if precision not in PRECISIONS:
            raise UserError(f"precision {precision!r} is not supported", hint=f"use one of {', '.join(PRECISIONS)}")
        if not all(hasattr(chunk, "zero_grad_buffer") for chunk in model_chunks):
            raise TypeError("TrainStep needs the DDP-wrapped chunks: call wrap_optimizer(torch_optimizer, model_chunks, parallelism) first")
        self.chunks = model_chunks
        self.optimizer = optimizer
        self.ctx = parallelism_ctx
        self.seq_length = seq_length
        self.micro_batch_size = micro_batch_size
        self.clip_grad = clip_grad or 0.0
        self.documents = documents
        if documents is not None and documents.reset_attention_mask:
            from llmforge.models.gpt import _use_transformer_engine

            if _use_transformer_engine():
                raise UserError("data.reset_attention_mask (and finetune packing) is built on SDPA attention; TransformerEngine's "
                                "packed-sequence path is not wired in yet, and TE is installed here",
                                "uninstall transformer_engine for this run, or turn reset_attention_mask / packing off")
        self.config = get_model_config(model_chunks[0])
        if self.config.sequence_parallel and seq_length % parallelism_ctx.tp_size:
            raise UserError(
                f"seq_length {seq_length} is not divisible by tensor_model_parallel_size {parallelism_ctx.tp_size}, which sequence parallelism needs",
                hint="change the sequence length or turn sequence_parallel off",
            )
        self.config.finalize_model_grads_func = finalize_model_grads
        self._forward_backward = get_forward_backward_func()
        self._autocast = autocast(precision, parallelism_ctx.device)
        # The grad norm sums each shard once: the DistributedOptimizer's shards are disjoint
        # over DP, otherwise DP replicas hold equal grads and one replica counts. Routed experts
        # (their own optimizer) are replicated over the expert-data-parallel group instead.
        from megatron.core import parallel_state

        from llmforge.runtime.optim import sub_optimizers

        expert_dp_rank = parallel_state.get_expert_data_parallel_rank(partial_expert_data_parallel=True)
        self._optimizers = sub_optimizers(optimizer)
        self._norm_optimizers = [
            inner for inner in self._optimizers
            if isinstance(inner, DistributedOptimizer) or (expert_dp_rank if getattr(inner, "holds_experts", False) else parallelism_ctx.dp_rank) == 0
        ]
        self._counts_grad_norm = bool(self._norm_optimizers)
        self._holds_loss = parallelism_ctx.is_last_stage and parallelism_ctx.tp_rank == 0
        self._positions_cache: dict[tuple[int, int], torch.Tensor] = {}
        # (loss, grad_norm) -> bool, asked before every finite update; False drops it (on_spike).
        self.update_guard: Callable[[float, float], bool] | None = None
        self._token_counts: dict[int, torch.Tensor] = {}
        # One process with its grads in place: our own loop and autograd's grads instead of
        # megatron's schedule and DDP's buffer, bitwise the same (runtime/local_schedule.py).
        # Either runs the schedule and owns the grads' life cycle within a step.
        self.local_refusal = local_refusal(model_chunks, optimizer, self.config, parallelism_ctx.world_size)
        self._grads: LocalStep | MegatronGrads = (LocalStep(model_chunks[0], optimizer) if self.local_refusal is None
                                                  else MegatronGrads(self))

    # --- the step --------------------------------------------------------------------

    def __call__(self, micro_batches: list[MicroBatch], lr: float, loss_masks: list[torch.Tensor] | None = None,
                 segments: list[torch.Tensor] | None = None) -> StepResult:
        """One optimizer step over `micro_batches` (this DP rank's share of the global batch).

        Args:
            loss_masks: optional float masks [micro_batch_size, seq_length], one per micro
                batch, weighting each target token (0 = not trained on, e.g. a prompt).
            segments: with `documents`, each input token's example index [micro_batch_size,
                seq_length] in a packed finetune row (pretraining windows split at EOD instead).
        """
        grads = self._grads
        grads.clear()
        outputs = self._run_schedule(micro_batches, loss_masks, forward_only=False, segments=segments)
        grads.prepare()
        grad_sq = self._grad_sq() if self._counts_grad_norm else None
        fault_point("step_before_reduce")
        loss_sum, num_tokens, grad_sq = self._reduce(outputs, grad_sq)
        loss = loss_sum / max(num_tokens, 1.0)
        grad_norm = math.sqrt(grad_sq) if grad_sq >= 0 else float("nan")
        nonfinite = not (math.isfinite(loss) and math.isfinite(grad_norm))
        # Every rank saw the same reduced numbers, so every rank skips together.
        if nonfinite or (self.update_guard is not None and not self.update_guard(loss, grad_norm)):
            grads.discard()
            return StepResult(loss, grad_norm, nonfinite, int(num_tokens), applied=False)

        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
        if self.clip_grad > 0 and grad_norm > self.clip_grad:
            torch._foreach_mul_(grads.grads(), self.clip_grad / (grad_norm + 1.0e-6))
        self.optimizer.step_with_ready_grads()
        return StepResult(loss, grad_norm, False, int(num_tokens))

    @torch.no_grad()
    def eval_loss(self, micro_batches: list[MicroBatch], loss_masks: list[torch.Tensor] | None = None,
                  segments: list[torch.Tensor] | None = None) -> tuple[float, int]:
        """(summed loss, target-token count) over the micro batches and all DP ranks; same on every rank.

        Scored as training reads them: with `documents`, val_loss means the same as the train loss."""
        with self.evaluating():
            outputs = self._run_schedule(micro_batches, loss_masks, forward_only=True, segments=segments)
        loss_sum, num_tokens, _ = self._reduce(outputs, None)
        return loss_sum, int(num_tokens)

    def evaluating(self) -> contextlib.AbstractContextManager:
        """The chunks in eval mode inside (`eval_mode`): a val pass of many batches switches once around all of them."""
        return eval_mode(self.chunks)

    # --- internals -------------------------------------------------------------------

    @property
    def schedule_seq_length(self) -> int:
        """The sequence length of what pipeline stages pass each other (a subclass may read more)."""
        return self.seq_length

    def _positions(self, batch: int, length: int) -> torch.Tensor:
        key = (batch, length)
        positions = self._positions_cache.get(key)
        if positions is None:
            positions = self._positions_cache[key] = torch.arange(length, device=self.ctx.device).unsqueeze(0).expand(batch, length)
        return positions

    def _token_count(self, count: int) -> torch.Tensor:
        # The schedule only adds these into its own accumulator, so one tensor per value is reused.
        tensor = self._token_counts.get(count)
        if tensor is None:
            tensor = self._token_counts[count] = torch.tensor(count, dtype=torch.int, device=self.ctx.device)
        return tensor

    def _check(self, micro_batches: list[MicroBatch]) -> None:
        expected = (self.micro_batch_size, self.seq_length + 1)
        for index, batch in enumerate(micro_batches):
            if tuple(batch.shape) != expected:
                raise ValueError(f"micro batch {index} has shape {tuple(batch.shape)}; TrainStep expects {expected} (tokens plus the next one)")

    def _run_schedule(self, micro_batches: list[MicroBatch], loss_masks: list[torch.Tensor] | None, *, forward_only: bool,
                      segments: list[torch.Tensor] | None = None) -> list:
        self._check(micro_batches)
        device = self.ctx.device
        items = [
            (batch.to(device, non_blocking=True), None if loss_masks is None else loss_masks[i].to(device, non_blocking=True))
            for i, batch in enumerate(micro_batches)
        ]
        # Pretraining windows split at EOD; finetune rows only when packed (an evaluator's own rows are one example each).
        if self.documents is not None and (segments is not None or self.documents.eod_id is not None):
            items = [(batch, _Packed(mask, None if segments is None else segments[i].to(device, non_blocking=True)))
                     for i, (batch, mask) in enumerate(items)]
        return self._grads.run(self._forward_step, items, forward_only=forward_only)

    def _forward_step(self, data_iterator: Iterator, model: torch.nn.Module):
        batch, mask = next(data_iterator)
        tokens, labels = batch[:, :-1], batch[:, 1:]
        if isinstance(mask, _Packed):
            from llmforge.runtime.documents import prepare

            positions, attention_mask, mask = prepare(self.documents, tokens, mask.mask, mask.segments)
            with self._autocast():
                output = model(tokens, self._positions(*tokens.shape) if positions is None else positions, attention_mask,
                               labels=labels, **({"document_positions": True} if positions is not None else {}))
            return self._stage_output(model, output), functools.partial(self._sum_loss, mask)
        with self._autocast():
            output = model(tokens, self._positions(tokens.shape[0], tokens.shape[1]), None, labels=labels)
        return self._stage_output(model, output), functools.partial(self._sum_loss, mask)

    def _stage_output(self, model: torch.nn.Module, output: torch.Tensor) -> torch.Tensor:
        """The last stage's losses (or scores, log-probs) in fp32; an earlier stage's hidden states
        in the dtype stages pass each other (`config.pipeline_dtype`: bf16 under megatron's bf16,
        else fp32). Under autocast megatron's residual add follows the branch dtype (bf16 without
        biases, fp32 with them), hence the cast."""
        from llmforge.models.init import unwrap

        if unwrap(model).post_process:
            return output.float()
        return output.to(self.config.pipeline_dtype)

    def _sum_loss(self, mask: torch.Tensor | None, per_token_loss: torch.Tensor):
        # Summed, not averaged: megatron divides the grads by the global token count
        # (calculate_per_token_loss), so micro batches and DP ranks weigh per token.
        if mask is None:
            total = per_token_loss.sum()
            count = self._token_count(per_token_loss.numel())
        else:
            total = (per_token_loss * mask).sum()
            count = mask.sum().to(torch.int)
        return total, count, (total.detach(), count)

    def _grad_sq(self) -> torch.Tensor:
        grads = self._grads.norm_grads()
        if not grads:
            return torch.zeros((), dtype=torch.float64, device=self.ctx.device)
        return torch.stack(torch._foreach_norm(grads)).double().square().sum()

    def _reduce(self, outputs: list, grad_sq: torch.Tensor | None) -> tuple[float, float, float]:
        """(loss sum, token count, squared grad norm), summed over every rank in one all-reduce."""
        zero = torch.zeros((), dtype=torch.float64, device=self.ctx.device)
        if self._holds_loss and outputs:
            loss_sum = torch.stack([total for total, _ in outputs]).double().sum()
            num_tokens = torch.stack([count for _, count in outputs]).double().sum()
        else:
            loss_sum, num_tokens = zero, zero
        stats = torch.stack([loss_sum, num_tokens, zero if grad_sq is None else grad_sq])
        if self.ctx.world_size > 1:
            host_collectives.all_reduce(stats)
        loss_sum, num_tokens, grad_sq = stats.tolist()
        return loss_sum, num_tokens, grad_sq
