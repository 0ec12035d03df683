"""The CPU layer's speed pieces (issue 31) change nothing but time.

At DP=1 over fp32 parameters autograd accumulates straight into DDP's main grads (no
per-parameter hook), and megatron's TP-region identities at TP=1 are skipped: the losses
and the trained weights must be bitwise those of megatron's own hooks and mappings. Megatron
is imported with an eager `jit_fuser`, so a run never loads inductor.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from llmforge.models import cpu_compat
from llmforge.runtime import optim
from llmforge.spec.components import AdamW, GPTModel
from llmforge.spec.schema import ParallelismConfig

OPTIONS = dict(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=64, seq_length=16,
               position_embedding_type="learned_absolute", normalization="LayerNorm", activation="gelu", add_bias_linear=True)


def _train(*, fast: bool, precision: str = "fp32", micro_batches: int = 2, steps: int = 4):
    """Losses and weights after `steps` steps, with the speed pieces on (`fast`) or megatron's own way."""
    from megatron.core.tensor_parallel import layers

    from llmforge.models.gpt import build_gpt
    from llmforge.runtime.distributed import init_distributed
    from llmforge.runtime.step import TrainStep

    parallelism = ParallelismConfig()
    ctx = init_distributed(parallelism, seed=7)
    names = ("copy_to_tensor_model_parallel_region", "reduce_from_tensor_model_parallel_region")
    mappings = {name: getattr(layers, name) for name in names}
    grads_in_place = optim._grads_in_place
    try:
        if not fast:
            for name, mapping in mappings.items():
                setattr(layers, name, mapping.__wrapped__)
            optim._grads_in_place = lambda *args: False
        chunks = build_gpt(GPTModel(**OPTIONS), parallelism, precision=precision, seed=7)
        optimizer = optim.wrap_optimizer(optim.build_adamw(AdamW(lr=3e-3), model_chunks=chunks), chunks, parallelism)
        step = TrainStep(chunks, optimizer, parallelism_ctx=ctx, seq_length=16, micro_batch_size=4, precision=precision, clip_grad=0.5)
        generator = torch.Generator().manual_seed(0)
        losses = []
        for _ in range(steps):
            batches = [torch.randint(0, 64, (4, 17), generator=generator) for _ in range(micro_batches)]
            result = step(batches, 3e-3)
            losses.append((result.loss, result.grad_norm))
        weights = [p.detach().clone() for p in chunks[0].parameters()]
        return losses, weights, chunks[0].grads_in_place
    finally:
        for name, mapping in mappings.items():
            setattr(layers, name, mapping)
        optim._grads_in_place = grads_in_place


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_grads_in_place_and_skipped_identities_train_bitwise_alike(micro_batches):
    fast_losses, fast_weights, in_place = _train(fast=True, micro_batches=micro_batches)
    slow_losses, slow_weights, hooks_in_place = _train(fast=False, micro_batches=micro_batches)
    assert in_place and not hooks_in_place
    assert fast_losses == slow_losses  # loss and grad norm, every step, clipping included
    assert all(torch.equal(a, b) for a, b in zip(fast_weights, slow_weights, strict=True))


def test_megatron_bf16_keeps_the_hooks():
    """A bf16 parameter cannot hold an fp32 main grad as its `.grad`: DDP's hooks stay."""
    _, _, in_place = _train(fast=True, precision="bf16", steps=1)
    assert not in_place


def test_the_mappings_still_run_over_a_real_group():
    """Only a TP group of one short-circuits; any other group reaches megatron's Function."""
    from megatron.core.tensor_parallel import layers

    cpu_compat.install()
    seen = []

    class Group:
        def size(self):
            return 2

    mapping = cpu_compat._identity_unless_parallel(lambda input_, group=None: seen.append(group) or input_ * 2)
    x = torch.ones(2)
    assert mapping(x, group=Group()).tolist() == [2.0, 2.0] and len(seen) == 1
    assert hasattr(layers.copy_to_tensor_model_parallel_region, "__wrapped__")


def test_collectives_over_a_group_of_one_return_at_once_and_others_reach_torch(monkeypatch):
    """finalize_model_grads' all-reduces and its token-count broadcast over groups of one skip c10d;
    a group of two (or an async call) still reaches torch.distributed."""
    cpu_compat.install()
    reached = []
    monkeypatch.setattr(torch.distributed, "broadcast", lambda *a, **k: reached.append(("broadcast", k["group"].size())))
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda *a, **k: reached.append(("all_reduce", k["group"].size())))

    class Group:
        def __init__(self, n):
            self.n = n

        def size(self):
            return self.n

    distributed = cpu_compat._DistributedWithoutGroupsOfOne("torch.distributed")
    tokens = torch.tensor(768)
    assert distributed.broadcast(tokens, src=0, group=Group(1)) is None and distributed.all_reduce(tokens, group=Group(1)) is None
    assert reached == [] and tokens.item() == 768
    distributed.broadcast(tokens, src=0, group=Group(2))
    distributed.all_reduce(tokens, group=Group(2))
    distributed.broadcast(tokens, src=0, group=Group(1), async_op=True)
    assert reached == [("broadcast", 2), ("all_reduce", 2), ("broadcast", 1)]
    import importlib

    fmg = importlib.import_module("megatron.core.distributed.finalize_model_grads")  # the package re-exports the function
    assert isinstance(fmg.torch.distributed, cpu_compat._DistributedWithoutGroupsOfOne)  # where the step's broadcast goes


def test_megatron_is_imported_without_inductor():
    """The CPU layer imports megatron-core first with an eager jit_fuser: no dynamo/inductor import (~1.5 s)."""
    code = ("import sys, torch\n"
            "from llmforge.models import cpu_compat\n"
            "assert cpu_compat.install()\n"
            "import megatron.core.jit as jit, megatron.core.fusions.fused_bias_gelu as gelu\n"
            "assert jit.jit_fuser is cpu_compat._eager and torch.compile is not cpu_compat._eager\n"
            "assert not hasattr(gelu.bias_gelu, '_torchdynamo_orig_callable')\n"
            "assert 'torch._inductor' not in sys.modules, 'inductor imported'\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
