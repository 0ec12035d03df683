"""One process's step (runtime/local_schedule.py) is megatron's schedule and grad buffer, bitwise.

Two copies of one model (same seed) train on the same batches, one through `LocalStep` and one
through megatron's `forward_backward_no_pipelining`, `finalize_model_grads` and DDP's buffer
(`_local = None`): losses, grad norms, weights and optimizer state must be equal, not close.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("megatron.core")

from llmforge.runtime.local_schedule import LocalStep  # noqa: E402
from llmforge.runtime.step import MegatronGrads  # noqa: E402
from llmforge.spec.components import SGD, AdamW, GPTModel  # noqa: E402
from llmforge.spec.schema import ParallelismConfig  # noqa: E402

NANOGPT = dict(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=96, seq_length=16,
               position_embedding_type="learned_absolute", normalization="LayerNorm", activation="gelu", add_bias_linear=False)
MICRO = 3


def _step(options: dict, *, precision: str = "fp32", optimizer=None, local: bool = True, clip_grad: float = 0.5):
    from llmforge.models.gpt import build_gpt
    from llmforge.runtime.distributed import init_distributed
    from llmforge.runtime.optim import build_adamw, build_sgd, wrap_optimizer
    from llmforge.runtime.step import TrainStep

    parallelism = ParallelismConfig()
    ctx = init_distributed(parallelism, seed=3)
    chunks = build_gpt(GPTModel(**options), parallelism, precision=precision, seed=3)
    optimizer = optimizer or AdamW(lr=3e-3, weight_decay=0.1)
    build = build_sgd if isinstance(optimizer, SGD) else build_adamw
    wrapped = wrap_optimizer(build(optimizer, model_chunks=chunks), chunks, parallelism)
    step = TrainStep(chunks, wrapped, parallelism_ctx=ctx, seq_length=options["seq_length"], micro_batch_size=MICRO,
                     precision=precision, clip_grad=clip_grad)
    if not local:
        step._grads, step.local_refusal = MegatronGrads(step), "megatron's path, for comparison"
    return step


def _batches(options: dict, seed: int, count: int):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, options["vocab_size"], (MICRO, options["seq_length"] + 1), generator=g) for _ in range(count)]


def _masks(options: dict, seed: int, count: int):
    """Loss masks with a row that trains on nothing (a prompt-only row) and fractional weights."""
    g = torch.Generator().manual_seed(seed)
    masks = [(torch.rand(MICRO, options["seq_length"], generator=g) > 0.3).float() for _ in range(count)]
    masks[0][1] = 0.0
    masks[-1][0, :4] = 0.5
    return masks


def _state(step) -> list[torch.Tensor]:
    inner = step.optimizer.optimizer
    return [p.detach() for p in step.chunks[0].parameters()] + [t for p in inner.state.values() for t in p.values() if torch.is_tensor(t)]


def _assert_same(a, b):
    sa, sb = _state(a), _state(b)
    assert len(sa) == len(sb)
    assert all(torch.equal(x, y) for x, y in zip(sa, sb))


CASES = {
    "nanogpt-one-micro-batch": (NANOGPT, 1, False, None),
    "nanogpt-micro-batches-masked": (NANOGPT, 3, True, None),
    # RoPE, GQA, SwiGLU, RMSNorm, untied output; SGD with momentum
    "llama-sgd": (dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, vocab_size=96, seq_length=16,
                       position_embedding_type="rope", normalization="RMSNorm", activation="swiglu", add_bias_linear=False,
                       untie_embeddings_and_output_weights=True), 2, False, SGD(lr=0.05, momentum=0.9)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_local_step_is_megatrons_bitwise(case):
    options, count, masked, optimizer = CASES[case]
    local, megatron = _step(options, optimizer=optimizer), _step(options, optimizer=optimizer, local=False)
    assert local.local_refusal is None and isinstance(local._grads, LocalStep)
    _assert_same(local, megatron)
    clipped = 0
    for i in range(4):
        batches = _batches(options, 10 + i, count)
        masks = _masks(options, 20 + i, count) if masked else None
        a, b = local(batches, 3e-3, masks), megatron(batches, 3e-3, masks)
        assert (a.loss, a.grad_norm, a.num_tokens, a.applied) == (b.loss, b.grad_norm, b.num_tokens, b.applied)
        clipped += a.grad_norm > 0.5
        _assert_same(local, megatron)
    assert clipped, "no step was clipped: the clip path went untested"
    batches = _batches(options, 99, count)
    assert local.eval_loss(batches) == megatron.eval_loss(batches)


def test_a_vetoed_update_changes_nothing_and_the_next_one_matches():
    local, megatron = _step(NANOGPT), _step(NANOGPT, local=False)
    for step in (local, megatron):
        step.update_guard = lambda loss, norm: False
    batches = _batches(NANOGPT, 5, 2)
    before = [t.clone() for t in _state(local)]
    a, b = local(batches, 3e-3), megatron(batches, 3e-3)
    assert not a.applied and (a.loss, a.grad_norm) == (b.loss, b.grad_norm)
    assert all(torch.equal(x, y) for x, y in zip(before, _state(local)))
    for step in (local, megatron):
        step.update_guard = None
    assert local(batches, 3e-3).loss == megatron(batches, 3e-3).loss
    _assert_same(local, megatron)


def test_a_parameter_without_a_grad_is_stepped_with_zeros_as_megatrons_buffer_does():
    """A trainable parameter the forward never used has a zero grad in DDP's buffer, and the
    optimizer still steps it (weight decay moves it): locally it must get zeros, not be skipped."""
    local, megatron = _step(NANOGPT, clip_grad=0.0), _step(NANOGPT, local=False, clip_grad=0.0)
    # The learned position table, cut out of the graph (the forward reads it detached).
    for step in (local, megatron):
        gpt = step.chunks[0].module
        table = gpt.embedding.position_embeddings
        table.forward = lambda ids, weight=table.weight: torch.nn.functional.embedding(ids, weight.detach())
    batches = _batches(NANOGPT, 7, 1)
    local(batches, 3e-3), megatron(batches, 3e-3)
    weight = local.chunks[0].module.embedding.position_embeddings.weight
    assert weight.grad is not None and not weight.grad.any()
    _assert_same(local, megatron)


@pytest.mark.parametrize("precision, expected", [("bf16", "bf16 parameters"), ("bf16-autocast", None), ("fp32", None)])
def test_where_megatrons_schedule_stays(precision, expected):
    step = _step(NANOGPT, precision=precision)
    if expected is None:
        assert step.local_refusal is None
    else:
        assert expected in step.local_refusal and isinstance(step._grads, MegatronGrads)


def test_moe_keeps_megatrons_schedule():
    moe = dict(NANOGPT, num_moe_experts=2, moe_router_topk=2)
    step = _step(moe)
    assert step.local_refusal == "megatron's ChainedOptimizer" and isinstance(step._grads, MegatronGrads)
    # Frozen experts (LoRA) leave one FP32Optimizer: the config still keeps megatron's schedule,
    # which scales the routers' auxiliary losses.
    from megatron.core.optimizer.optimizer import FP32Optimizer

    from llmforge.runtime.local_schedule import local_refusal

    dense_only = object.__new__(FP32Optimizer)
    assert local_refusal(step.chunks, dense_only, step.config, 1) == "a config switch only megatron's schedule handles"
    assert local_refusal(step.chunks, dense_only, step.config, 2) == "more than one process"


def test_a_backward_calls_no_python_hook():
    """With grads in place DDP's per-parameter hooks are no-ops (cpu_compat.hookless_ddp), and
    wrap_optimizer releases the accumulators that carry them: autograd calls nothing in Python."""
    import sys

    step = _step(NANOGPT)
    assert step.chunks[0].grads_in_place and step.chunks[0].grad_accs == []
    called = []

    def profile(frame, event, arg):
        if event == "call" and frame.f_code.co_name == "_noop_grad_hook":
            called.append(1)

    sys.setprofile(profile)
    try:
        step(_batches(NANOGPT, 1, 1), 3e-3)
    finally:
        sys.setprofile(None)
    assert not called


def test_ddps_grad_buffer_is_released_and_cannot_be_read_by_mistake():
    """The local step never uses DDP's grad buffer (a second fp32 copy of every grad): its memory
    goes at the first step, and what would touch it after that raises instead of reading freed memory."""
    step = _step(NANOGPT)
    buffer = step.chunks[0].buffers[0]
    assert buffer.grad_data.untyped_storage().nbytes() >= 4 * sum(p.numel() for p in step.chunks[0].parameters())
    memory = buffer.grad_data.untyped_storage()._weak_ref()  # expires once no tensor holds the memory
    try:
        assert not torch.UntypedStorage._expired(memory)
        step(_batches(NANOGPT, 3, 1), 3e-3)
        assert torch.UntypedStorage._expired(memory)
    finally:
        torch.UntypedStorage._free_weak_ref(memory)
    assert buffer.grad_data.numel() == 0 and all(bucket.grad_data.numel() == 0 for bucket in buffer.buckets)
    param = next(p for p in step.chunks[0].parameters() if p.requires_grad)
    assert not hasattr(param, "main_grad")
    with pytest.raises(RuntimeError, match="grad buffers were released"):
        step.chunks[0].zero_grad_buffer()
    assert step(_batches(NANOGPT, 4, 1), 3e-3).applied  # and training goes on
