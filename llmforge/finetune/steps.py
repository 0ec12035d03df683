"""Training steps with the preference and RL losses: TrainStep with another loss per micro batch.

TrainStep runs megatron's schedule (gradient accumulation, DP grad reduction, the token
count that scales the grads), clipping and the update; these subclasses replace only the
forward of one micro batch and its loss. Losses are summed and paired with a count (pairs,
or response tokens), so the grads are per pair or per token over the whole global batch.

A micro batch of pairs holds one pair per row: chosen tokens then rejected tokens, side by
side ([m, 2 (L + 1)]), so the finetune loader serves it unchanged; the step splits it into
2m rows (chosen first) for one forward.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
import torch

from llmforge.finetune import losses
from llmforge.runtime.step import StepResult, TrainStep


def pair_rows(tokens: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[m, 2 (L + 1)] pairs and [m, 2 L] masks → [2m, L + 1] rows and [2m, L] masks, chosen rows first."""
    m = tokens.shape[0]
    rows = tokens.reshape(m, 2, -1).transpose(0, 1).reshape(2 * m, -1)
    row_masks = masks.reshape(m, 2, -1).transpose(0, 1).reshape(2 * m, -1)
    return rows, row_masks


class _PairStep(TrainStep):
    """A step over preference pairs: the loader's pair rows are split before the schedule runs."""

    def __init__(self, *args, micro_batch_size: int, **kwargs):
        super().__init__(*args, micro_batch_size=2 * micro_batch_size, **kwargs)

    def __call__(self, micro_batches, lr, loss_masks=None) -> StepResult:
        rows = [pair_rows(t, m) for t, m in zip(micro_batches, loss_masks)]
        return super().__call__([r for r, _ in rows], lr, [m for _, m in rows])

    def eval_loss(self, micro_batches, loss_masks=None) -> tuple[float, int]:
        rows = [pair_rows(t, m) for t, m in zip(micro_batches, loss_masks)]
        return super().eval_loss([r for r, _ in rows], [m for _, m in rows])

    def _pair_count(self, rows: int) -> torch.Tensor:
        return self._token_count(rows // 2)


@dataclass
class _Scored:
    """A micro batch's loss mask and its rows' reference log-probs [2m, L], moved to the device as one."""

    mask: torch.Tensor
    reference_logp: torch.Tensor

    def to(self, device, non_blocking: bool = False) -> _Scored:
        return _Scored(self.mask.to(device, non_blocking=non_blocking), self.reference_logp.to(device, non_blocking=non_blocking))


class PreferenceStep(_PairStep):
    """DPO (or IPO): policy log-likelihoods of chosen and rejected responses against a frozen reference.

    The reference's log-probs of each micro batch are taken before the schedule runs, through
    its `ModelServer` (any layout: under pipeline parallelism the reference's own stages could
    not ride along the policy's), so resume needs nothing extra.

    Args:
        reference: a `runtime.serve.ModelServer` over the frozen reference's chunks (same layout).
    """

    def __init__(self, *args, reference, beta: float, loss: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.reference, self.beta, self.loss_kind = reference, beta, loss

    def _run_schedule(self, micro_batches, loss_masks, *, forward_only: bool, segments=None) -> list:
        # Replica-local: each DP replica scores its own micro batches.
        scored = [_Scored(m, self.reference.logprobs(t, micro_batch_size=t.shape[0], shared=False))
                  for t, m in zip(micro_batches, loss_masks)]
        return super()._run_schedule(micro_batches, scored, forward_only=forward_only, segments=segments)

    def _forward_step(self, data_iterator, model):
        batch, scored = next(data_iterator)
        tokens, labels = batch[:, :-1], batch[:, 1:]
        positions = self._positions(tokens.shape[0], tokens.shape[1])
        with self._autocast():
            output = model(tokens, positions, None, labels=labels)  # a middle PP stage: its hidden states
        return self._stage_output(model, output), functools.partial(self._dpo_loss, scored.mask, -scored.reference_logp)

    def _dpo_loss(self, mask: torch.Tensor, reference_loss: torch.Tensor, per_token_loss: torch.Tensor):
        policy = losses.sequence_logprobs(per_token_loss, mask)
        reference = losses.sequence_logprobs(reference_loss, mask)
        m = policy.shape[0] // 2
        pair_losses = losses.dpo_loss(policy[:m], policy[m:], reference[:m], reference[m:], beta=self.beta, kind=self.loss_kind)
        total, count = pair_losses.sum(), self._pair_count(policy.shape[0])
        return total, count, (total.detach(), count)


class RewardModelStep(_PairStep):
    """Bradley-Terry on the scalar head, read at each row's last token (its mask marks it in target
    coordinates, so the whole row of L + 1 tokens is the input)."""

    @property
    def schedule_seq_length(self) -> int:
        # The whole row of L + 1 tokens is the input, padded for sequence parallelism (below):
        # the length pipeline stages pass on.
        return -(-(self.seq_length + 1) // self.ctx.tp_size) * self.ctx.tp_size

    def _forward_step(self, data_iterator, model):
        from llmforge.finetune.reward_model import sequence_scores
        from llmforge.models.init import unwrap

        batch, mask = next(data_iterator)
        # Sequence parallelism splits the sequence evenly: pad at the end (causal, so unseen).
        width = self.schedule_seq_length
        tokens = torch.nn.functional.pad(batch, (0, width - batch.shape[1]))
        positions = self._positions(tokens.shape[0], width)
        with self._autocast():
            if not unwrap(model).post_process:  # a pipeline stage before the head: its hidden states go on
                return self._stage_output(model, model(tokens, positions, None)), self._bt_loss
            scores = sequence_scores(model, tokens, positions, mask.argmax(dim=1) + 1)
        return scores, self._bt_loss

    def _bt_loss(self, scores: torch.Tensor):
        m = scores.shape[0] // 2
        total, count = losses.bradley_terry_loss(scores[:m], scores[m:]).sum(), self._pair_count(scores.shape[0])
        return total, count, (total.detach(), count)


@dataclass
class Rollout:
    """What one micro batch of a rollout carries besides its tokens; moved to the device as one."""

    mask: torch.Tensor  # [b, L] completion targets
    advantages: torch.Tensor  # [b]
    old_logp: torch.Tensor | None = None  # [b, L] per-token log-probs of the sampling policy (updates_per_rollout > 1)
    reference_logp: torch.Tensor | None = None  # [b, L] of the reference model (kl_coef > 0)

    def to(self, device, non_blocking: bool = False) -> Rollout:
        move = lambda t: None if t is None else t.to(device, non_blocking=non_blocking)  # noqa: E731
        return Rollout(move(self.mask), move(self.advantages), move(self.old_logp), move(self.reference_logp))


class PolicyGradientStep(TrainStep):
    """GRPO's clipped policy-gradient objective with a KL penalty, over the completion tokens.

    One call makes `updates` optimizer updates on the same rollout; the first is on-policy
    (π = π_old, the ratio is 1 and only the clip's gradient path differs from REINFORCE).
    π is taken at the sampling temperature, without top-k/top-p (see `tempered_logprobs`).
    Plain masked batches (the val split's reference answers) take TrainStep's loss.
    """

    def __init__(self, *args, clip_epsilon: float, kl_coef: float, updates: int, temperature: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.clip_epsilon, self.kl_coef, self.updates, self.temperature = clip_epsilon, kl_coef, updates, temperature

    def __call__(self, micro_batches, lr, loss_masks=None) -> StepResult:
        for _ in range(self.updates):
            result = super().__call__(micro_batches, lr, loss_masks)
            # A vetoed update (non-finite, or a spike the guard drops) ends the rollout, so the loop
            # and the guard's verdict see that update: it counts once, and `stop` stops at it.
            if not result.applied:
                break
        return result

    def _forward_step(self, data_iterator, model):
        batch, extra = next(data_iterator)
        if not isinstance(extra, Rollout):
            return super()._forward_step(iter([(batch, extra)]), model)
        tokens, labels = batch[:, :-1], batch[:, 1:]
        with self._autocast():
            logp = tempered_logprobs(model, tokens, self._positions(tokens.shape[0], tokens.shape[1]), labels,
                                     temperature=self.temperature)
        return self._stage_output(model, logp), functools.partial(self._policy_loss, extra)

    def _policy_loss(self, rollout: Rollout, logp: torch.Tensor):
        old = rollout.old_logp if rollout.old_logp is not None else logp.detach()
        token_loss = losses.grpo_token_loss(logp, old, rollout.advantages, clip_epsilon=self.clip_epsilon,
                                            reference_logp=rollout.reference_logp, kl_coef=self.kl_coef)
        total = (token_loss * rollout.mask).sum()
        count = rollout.mask.sum().to(torch.int)
        return total, count, (total.detach(), count)


def tempered_logprobs(model: torch.nn.Module, tokens: torch.Tensor, positions: torch.Tensor, labels: torch.Tensor, *,
                      temperature: float) -> torch.Tensor:
    """log softmax(logits / temperature) [b, L] at `labels`: RL's log-probs, at the temperature rollouts are sampled at.

    As in TRL, top-k and top-p are left out: the log-probs are those of the whole tempered
    distribution, not of the truncated one the sampler draws from. The truncated set moves
    with the policy between updates, and the reference would give -inf to a token outside its
    own set, which neither the ratio nor the KL penalty can take.
    """
    from llmforge.models.init import unwrap

    if not unwrap(model).post_process:
        return model(tokens, positions, None)  # a pipeline stage before the output layer: its hidden states go on
    if temperature == 1.0:
        return -model(tokens, positions, None, labels=labels)  # megatron's own loss, without a copy of the logits
    from megatron.core import tensor_parallel

    logits = model(tokens, positions, None)  # [b, L, vocab / TP]: this rank's shard of the vocabulary
    return -tensor_parallel.vocab_parallel_cross_entropy(logits.float() / temperature, labels)
