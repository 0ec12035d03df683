"""A stage's model FLOPs per token (`plan.finetune.flops_per_token`, what plan and run divide MFU by)
against what torch's own FlopCounterMode counts in one forward and backward of the stage's model."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

pytest.importorskip("megatron.core")

from llmforge.models import size  # noqa: E402
from llmforge.plan.finetune import flops_per_token  # noqa: E402
from llmforge.spec.components import GPTModel  # noqa: E402
from llmforge.spec.schema import ParallelismConfig  # noqa: E402

OPTIONS = dict(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=128, seq_length=16,
               position_embedding_type="learned_absolute", normalization="LayerNorm", activation="gelu", add_bias_linear=False)
MATMULS = {"mm", "addmm", "bmm", "matmul"}  # the weights' products; attention (SDPA) is counted apart
BATCH = 3


def _model():
    from llmforge.models.gpt import build_gpt
    from llmforge.runtime.distributed import init_distributed

    init_distributed(ParallelismConfig(), seed=5)
    (model,) = build_gpt(GPTModel(**OPTIONS), ParallelismConfig(), precision="fp32", seed=5)
    return model


def _matmul_flops_per_token(model, *, backward: bool) -> float:
    s = OPTIONS["seq_length"]
    ids = torch.randint(0, OPTIONS["vocab_size"], (BATCH, s + 1), generator=torch.Generator().manual_seed(1))
    counter = FlopCounterMode(display=False)
    with counter, torch.set_grad_enabled(backward):
        loss = model(ids[:, :-1], torch.arange(s).expand(BATCH, -1), None, labels=ids[:, 1:]).sum()
        if backward:
            loss.backward()
    counts = counter.get_flop_counts()["Global"]
    return sum(flops for op, flops in counts.items() if str(op).split(".")[1] in MATMULS) / (BATCH * s)


def _attention(model_options) -> float:
    return size.attention_flops_per_token(model_options, OPTIONS["seq_length"])


def _norms(model) -> int:
    """N counts the norms' weights too (non-embedding parameters, as 6·N does), which no product multiplies."""
    return sum(p.numel() for p in model.parameters() if p.dim() == 1)


def test_full_training_is_six_n():
    shape, model = GPTModel(**OPTIONS), _model()
    counted = _matmul_flops_per_token(model, backward=True)
    planned = flops_per_token(shape, SimpleNamespace(type="pretrain"), 16) - _attention(shape)
    assert planned == 6 * size.matmul_params(shape)
    assert counted == pytest.approx(planned - 6 * _norms(model), rel=1e-9)


def test_a_frozen_base_computes_no_weight_gradients():
    from llmforge.finetune.lora import attach_lora
    from llmforge.finetune.prompt import attach_soft_prompt

    shape = GPTModel(**OPTIONS)
    targets = ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]
    stage = SimpleNamespace(type="lora", lora=SimpleNamespace(rank=8, target_modules=targets))
    model = _model()
    norms = _norms(model)
    attach_lora([model], targets=targets, rank=8, alpha=16, dropout=0.0, seed=5)
    adapters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    counted = _matmul_flops_per_token(model, backward=True)
    planned = flops_per_token(shape, stage, 16) - _attention(shape)
    assert planned == pytest.approx(4 * size.matmul_params(shape) + 6 * adapters)
    # Layer 0's qkv needs no input gradient (the frozen embedding's output does not), nor its
    # adapter's A: the one product 4·N counts that autograd skips.
    skipped = 2 * OPTIONS["hidden_size"] * (size.qkv_width(shape) + 8)
    assert counted == pytest.approx(planned - 4 * norms - skipped, rel=1e-9)

    model = _model()
    attach_soft_prompt([model], num_virtual_tokens=4, init="random", token_ids=[], seed=5)
    # The soft prompt takes the first 4 of the 16 positions (which count as tokens); its gradient
    # needs layer 0's input gradients too, so here 4·N is what runs.
    counted = _matmul_flops_per_token(model, backward=True)
    planned = flops_per_token(shape, SimpleNamespace(type="prompt_tuning"), 16) - _attention(shape)
    assert counted == pytest.approx(planned - 4 * norms, rel=1e-9)


def test_dpo_adds_the_reference_forward():
    shape, model = GPTModel(**OPTIONS), _model()
    norms = _norms(model)
    policy = _matmul_flops_per_token(model, backward=True)
    reference = _matmul_flops_per_token(_model(), backward=False)
    assert reference == pytest.approx(2 * (size.matmul_params(shape) - norms), rel=1e-9)
    dpo = flops_per_token(shape, SimpleNamespace(type="dpo"), 16) - 4 * _attention(shape) / 3  # the policy's and the reference's attention
    assert dpo - 8 * norms == pytest.approx(policy + reference, rel=1e-9)


def test_rl_counts_its_updates_and_every_forward_of_a_rollout():
    shape = GPTModel(**OPTIONS)
    full = flops_per_token(shape, SimpleNamespace(type="pretrain"), 16)
    forward = flops_per_token(shape, SimpleNamespace(type="dpo"), 16) - full  # one reference forward, measured above

    def rl(updates: int, kl: float, *rewards: str) -> float:
        stage = SimpleNamespace(type="rl", updates_per_rollout=updates, kl_coef=kl, rewards=[SimpleNamespace(name=n) for n in rewards])
        return flops_per_token(shape, stage, 16)

    assert rl(1, 0.0, "exact_match") == pytest.approx(full + forward)  # the update and the sampler's forward
    assert rl(1, 0.04, "exact_match") == pytest.approx(full + 2 * forward)  # the reference's log-probs
    assert rl(2, 0.04, "exact_match") == pytest.approx(2 * full + 3 * forward)  # the old policy's log-probs, a second update
    assert rl(2, 0.04, "exact_match", "reward_model") == pytest.approx(2 * full + 4 * forward)  # a reward model's score
