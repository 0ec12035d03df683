"""The losses of the preference and RL stages, on plain tensors so that tests can check them by hand.

Each takes summed (or per-token) log-probabilities that the stage's step computes from the
model's vocab-parallel cross entropy, so they are exact at any tensor-parallel size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sequence_logprobs(per_token_loss: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Summed log-probability of the masked targets of each row: [b, s] losses → [b]."""
    return -(per_token_loss * mask).sum(dim=1)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
             reference_rejected: torch.Tensor, *, beta: float, kind: str = "sigmoid") -> torch.Tensor:
    """Per-pair DPO loss (Rafailov et al. 2023), or IPO's (Azar et al. 2023) with `kind="ipo"`.

    h = (log π(c) − log π_ref(c)) − (log π(r) − log π_ref(r));
    sigmoid: −log σ(β h); ipo: (h − 1/(2β))².
    """
    h = (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected)
    if kind == "sigmoid":
        return -F.logsigmoid(beta * h)
    if kind == "ipo":
        return (h - 1.0 / (2.0 * beta)) ** 2
    raise ValueError(f"unknown DPO loss {kind!r}; use 'sigmoid' or 'ipo'")


def implicit_reward_margin(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
                           reference_rejected: torch.Tensor, *, beta: float) -> torch.Tensor:
    """DPO's implicit reward of chosen minus that of rejected: β h per pair."""
    return beta * ((policy_chosen - reference_chosen) - (policy_rejected - reference_rejected))


def bradley_terry_loss(reward_chosen: torch.Tensor, reward_rejected: torch.Tensor) -> torch.Tensor:
    """Per-pair −log σ(r(c) − r(r)): the reward model's pairwise loss."""
    return -F.logsigmoid(reward_chosen - reward_rejected)


def group_advantages(rewards: torch.Tensor, group_size: int, *, scale: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """GRPO's advantages: each reward minus its group's mean, over the group's std when `scale`.

    `rewards` holds consecutive groups of `group_size` completions of one prompt. A group
    whose completions all score the same gets advantage 0: it teaches nothing. The std is
    the population std (divide by G), as in the GRPO paper's implementation.
    """
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    groups = rewards.reshape(-1, group_size).to(torch.float64)
    centered = groups - groups.mean(dim=1, keepdim=True)
    if scale:
        centered = centered / (groups.std(dim=1, unbiased=False, keepdim=True) + eps)
    return centered.reshape(-1).to(rewards.dtype)


def kl_estimate(logp: torch.Tensor, reference_logp: torch.Tensor) -> torch.Tensor:
    """Per-token KL(π ‖ π_ref) estimate k3 = exp(ref − logp) − (ref − logp) − 1 (≥ 0, unbiased)."""
    log_ratio = reference_logp - logp
    return torch.exp(log_ratio) - log_ratio - 1.0


def grpo_token_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, *, clip_epsilon: float,
                    reference_logp: torch.Tensor | None = None, kl_coef: float = 0.0) -> torch.Tensor:
    """Per-token clipped policy-gradient loss with a KL penalty: [b, s] (mask it, then sum).

    −min(ρ A, clip(ρ, 1 − ε, 1 + ε) A) + β KL, with ρ = π / π_old per token and A the
    advantage of the token's sequence ([b], broadcast along s).
    """
    ratio = torch.exp(logp - old_logp)
    adv = advantages.unsqueeze(1)
    surrogate = torch.minimum(ratio * adv, torch.clamp(ratio, 1.0 - clip_epsilon, 1.0 + clip_epsilon) * adv)
    loss = -surrogate
    if reference_logp is not None and kl_coef:
        loss = loss + kl_coef * kl_estimate(logp, reference_logp)
    return loss
