"""Optimizer factories: parameter groups, the registered builders, and state for checkpoint loads."""

from __future__ import annotations

import pytest
import torch

from llmforge.registry.manager import get_registry
from llmforge.runtime.optim import _materialize_state, build_adamw, build_sgd, param_groups
from llmforge.spec.components import SGD, AdamW


class TinyGPT(torch.nn.Module):
    """Parameter names as megatron's GPTModel spells them."""

    def __init__(self):
        super().__init__()
        self.embedding = torch.nn.Module()
        self.embedding.word_embeddings = torch.nn.Embedding(16, 8)
        self.input_layernorm = torch.nn.LayerNorm(8)
        self.linear_qkv = torch.nn.Linear(8, 24)
        self.final_layernorm = torch.nn.RMSNorm(8)


def _names(model, group) -> set[str]:
    ids = {id(p) for p in group["params"]}
    return {name for name, p in model.named_parameters() if id(p) in ids}


@pytest.mark.parametrize("decay_embeddings", [True, False])
def test_no_decay_on_norms_and_biases_and_embeddings_by_option(decay_embeddings):
    model = TinyGPT()
    decay, no_decay = param_groups([model], weight_decay=0.1, decay_embeddings=decay_embeddings)
    norms_and_biases = {"input_layernorm.weight", "input_layernorm.bias", "linear_qkv.bias", "final_layernorm.weight"}
    embedding = {"embedding.word_embeddings.weight"}
    assert _names(model, decay) == {"linear_qkv.weight"} | (embedding if decay_embeddings else set())
    assert _names(model, no_decay) == norms_and_biases | (set() if decay_embeddings else embedding)
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
    # the keys megatron matches groups by when it loads optimizer state
    for group in (decay, no_decay):
        assert {"wd_mult", "lr_mult", "is_expert_parallel", "is_decoupled_lr"} <= set(group)


def test_both_groups_exist_even_when_empty():
    groups = param_groups([torch.nn.Linear(2, 2, bias=False)], weight_decay=0.1)
    assert [len(g["params"]) for g in groups] == [1, 0]


def test_registered_factories_build_fused_torch_optimizers():
    registry = get_registry()
    model = TinyGPT()
    adamw = registry.factory("optimizer", "adamw")(AdamW(lr=1e-3, betas=(0.9, 0.99), weight_decay=0.05), model_chunks=[model])
    assert isinstance(adamw, torch.optim.AdamW) and adamw.defaults["fused"]
    assert adamw.defaults["betas"] == (0.9, 0.99) and [g["weight_decay"] for g in adamw.param_groups] == [0.05, 0.0]
    sgd = registry.factory("optimizer", "sgd")(SGD(lr=0.1, momentum=0.9), params=param_groups([model], 0.0))
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["momentum"] == 0.9


@pytest.mark.parametrize("build", [lambda m: build_adamw(AdamW(lr=1.0, weight_decay=0.5), model_chunks=[m]),
                                   lambda m: build_sgd(SGD(lr=1.0, momentum=0.9, weight_decay=0.5), model_chunks=[m])])
def test_state_is_materialized_without_touching_weights(build):
    model = TinyGPT()
    optimizer = build(model)
    before = [p.detach().clone() for p in model.parameters()]
    _materialize_state(optimizer)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(len(optimizer.state[p]) for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())
    assert [g["lr"] for g in optimizer.param_groups] == [1.0, 1.0] and optimizer.param_groups[0]["weight_decay"] == 0.5


def test_the_distributed_optimizer_takes_adamw_only():
    """validate refuses the spec (spec/checks.py); wrap_optimizer refuses it too, before wrapping anything."""
    from llmforge.runtime.optim import wrap_optimizer
    from llmforge.spec.errors import UserError
    from llmforge.spec.schema import ParallelismConfig

    model = TinyGPT()
    with pytest.raises(UserError, match="use_distributed_optimizer shards AdamW's state only, not SGD's"):
        wrap_optimizer(build_sgd(SGD(lr=0.1), model_chunks=[model]), [model], ParallelismConfig(use_distributed_optimizer=True))


def test_a_val_pass_switches_eval_mode_once_and_restores_each_chunks_mode():
    """eval() and train() walk every module: TrainStep.evaluating switches once around many eval_loss calls,
    and leaves a chunk that was in eval mode (a frozen one) in eval mode."""
    from llmforge.runtime.step import TrainStep

    calls = []

    class Chunk(torch.nn.Module):
        def train(self, mode=True):
            calls.append(mode)
            return super().train(mode)

    step = TrainStep.__new__(TrainStep)
    step.chunks = [Chunk(), Chunk().eval()]
    calls.clear()
    with step.evaluating():
        with step.evaluating():  # eval_loss inside a val pass: nothing more to switch
            assert not any(c.training for c in step.chunks)
    assert calls == [False, True]  # the first chunk: to eval and back; the second stays in eval
    assert step.chunks[0].training and not step.chunks[1].training
