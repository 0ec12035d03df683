"""The preference and RL losses against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from llmforge.finetune import losses


def _t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def test_sequence_logprobs_sum_only_the_masked_targets():
    per_token_loss = _t(1.0, 2.0, 3.0, 4.0).reshape(1, 4)
    mask = _t(0.0, 1.0, 1.0, 0.0).reshape(1, 4)
    assert losses.sequence_logprobs(per_token_loss, mask).tolist() == [-5.0]


def test_dpo_sigmoid_loss_by_hand():
    # h = (−10 − (−11)) − (−12 − (−11.5)) = 1 + 0.5 = 1.5; β h = 0.15; −log σ(0.15)
    loss = losses.dpo_loss(_t(-10.0), _t(-12.0), _t(-11.0), _t(-11.5), beta=0.1)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-0.15)), abs=1e-12)
    assert loss.item() == pytest.approx(0.62096, abs=1e-5)


def test_dpo_at_the_reference_is_log_two_and_falls_as_chosen_rises():
    at_start = losses.dpo_loss(_t(-3.0), _t(-4.0), _t(-3.0), _t(-4.0), beta=0.5)
    assert at_start.item() == pytest.approx(math.log(2))
    policy_chosen = _t(-3.0).requires_grad_()
    losses.dpo_loss(policy_chosen, _t(-4.0), _t(-3.0), _t(-4.0), beta=0.5).backward()
    # d/dx −log σ(β x) at 0 = −β/2: raising log π(chosen) lowers the loss.
    assert policy_chosen.grad.item() == pytest.approx(-0.25)


def test_ipo_loss_by_hand():
    # h = 1.5, 1/(2β) = 5: (1.5 − 5)² = 12.25
    loss = losses.dpo_loss(_t(-10.0), _t(-12.0), _t(-11.0), _t(-11.5), beta=0.1, kind="ipo")
    assert loss.item() == pytest.approx(12.25)
    with pytest.raises(ValueError, match="ipo"):
        losses.dpo_loss(_t(0.0), _t(0.0), _t(0.0), _t(0.0), beta=0.1, kind="hinge")


def test_implicit_reward_margin():
    margin = losses.implicit_reward_margin(_t(-10.0, -1.0), _t(-12.0, -1.0), _t(-11.0, -1.0), _t(-11.5, -2.0), beta=0.1)
    assert margin.tolist() == pytest.approx([0.15, -0.1])


def test_bradley_terry_loss_by_hand():
    loss = losses.bradley_terry_loss(_t(2.0, 0.0, -1.0), _t(1.0, 0.0, 1.0))
    expected = [math.log1p(math.exp(-1.0)), math.log(2.0), math.log1p(math.exp(2.0))]
    assert loss.tolist() == pytest.approx(expected)
    assert loss.tolist() == pytest.approx([0.31326, 0.69315, 2.12693], abs=1e-5)


def test_group_advantages_by_hand():
    rewards = _t(1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5)
    # Group 1: mean 0.5, population std 0.5 → ±1; group 2: all equal → 0.
    advantages = losses.group_advantages(rewards, 4)
    assert advantages.tolist() == pytest.approx([1.0, -1.0, -1.0, 1.0, 0.0, 0.0, 0.0, 0.0], abs=1e-5)
    centered = losses.group_advantages(_t(3.0, 1.0, 2.0, 2.0), 2, scale=False)
    assert centered.tolist() == [1.0, -1.0, 0.0, 0.0]
    uneven = losses.group_advantages(_t(1.0, 0.0, 0.0), 3)  # mean 1/3, std sqrt(2)/3
    assert uneven.tolist() == pytest.approx([math.sqrt(2), -1 / math.sqrt(2), -1 / math.sqrt(2)], abs=1e-5)
    with pytest.raises(ValueError, match="groups of 4"):
        losses.group_advantages(_t(1.0, 2.0, 3.0), 4)


def test_grpo_loss_on_policy_is_the_policy_gradient():
    logp = _t(-1.0, -2.0).reshape(1, 2).requires_grad_()
    loss = losses.grpo_token_loss(logp, logp.detach(), _t(0.5), clip_epsilon=0.2)
    assert loss.tolist() == [[-0.5, -0.5]]  # ratio 1
    loss.sum().backward()
    assert logp.grad.tolist() == [[-0.5, -0.5]]  # −A ∂ρ/∂logp with ρ = 1


def test_grpo_clip_stops_the_gradient_past_the_trust_region():
    old = _t(0.0, 0.0, 0.0, 0.0).reshape(2, 2)
    logp = torch.log(_t(1.5, 0.9, 0.5, 1.1)).reshape(2, 2).requires_grad_()
    advantages = _t(1.0, -1.0)
    loss = losses.grpo_token_loss(logp, old, advantages, clip_epsilon=0.2)
    # Row 1 (A = 1): ρ = 1.5 clipped to 1.2 (no grad); ρ = 0.9 unclipped. Row 2 (A = −1):
    # ρ = 0.5 clipped to 0.8 (no grad); ρ = 1.1 inside.
    assert loss.flatten().tolist() == pytest.approx([-1.2, -0.9, 0.8, 1.1])
    loss.sum().backward()
    assert logp.grad.flatten().tolist() == pytest.approx([0.0, -0.9, 0.0, 1.1])


def test_kl_penalty_by_hand():
    logp, ref = _t(-1.0).reshape(1, 1), _t(-2.0).reshape(1, 1)
    # k3 = e^(ref − logp) − (ref − logp) − 1 = e^−1 + 1 − 1
    assert losses.kl_estimate(logp, ref).item() == pytest.approx(math.exp(-1.0))
    assert losses.kl_estimate(logp, logp).item() == 0.0
    loss = losses.grpo_token_loss(logp, logp, _t(0.0), clip_epsilon=0.2, reference_logp=ref, kl_coef=0.1)
    assert loss.item() == pytest.approx(0.1 * math.exp(-1.0))
