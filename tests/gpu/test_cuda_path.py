"""The CUDA path: nccl with one rank, none of the CPU shims, bf16 (megatron's, and autocast) with flash attention."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

SEQ, MICRO_BATCH, MICRO_BATCHES, VOCAB = 128, 4, 2, 512
# Llama's switches (RMSNorm, SwiGLU, RoPE, untied, no biases) at toy size; head dim 64.
SMALL = dict(num_layers=2, hidden_size=128, num_attention_heads=2, ffn_hidden_size=352, vocab_size=VOCAB, seq_length=SEQ,
             position_embedding_type="rope", normalization="RMSNorm", activation="swiglu", add_bias_linear=False,
             untie_embeddings_and_output_weights=True)


def _trainer(ctx, precision: str):
    from llmforge.models.gpt import build_gpt
    from llmforge.runtime.optim import build_adamw, wrap_optimizer
    from llmforge.runtime.step import TrainStep
    from llmforge.spec.components import AdamW, GPTModel
    from llmforge.spec.schema import ParallelismConfig

    parallelism = ParallelismConfig()
    chunks = build_gpt(GPTModel(**SMALL), parallelism, precision=precision, seed=1234)
    optimizer = wrap_optimizer(build_adamw(AdamW(lr=1e-3, weight_decay=0.0), model_chunks=chunks), chunks, parallelism)
    step = TrainStep(chunks, optimizer, parallelism_ctx=ctx, seq_length=SEQ, micro_batch_size=MICRO_BATCH, precision=precision, clip_grad=1.0)
    return chunks, optimizer, step


def _batches() -> list[torch.Tensor]:
    """Arithmetic runs mod VOCAB: learnable, so a few steps on them must lower the loss."""
    generator = torch.Generator().manual_seed(7)
    count = MICRO_BATCH * MICRO_BATCHES
    start = torch.randint(0, VOCAB, (count, 1), generator=generator)
    stride = torch.randint(1, 4, (count, 1), generator=generator)
    return list(((start + stride * torch.arange(SEQ + 1)) % VOCAB).split(MICRO_BATCH))


def test_nccl_with_one_rank(parallel_ctx):
    import torch.distributed as dist
    from megatron.core import parallel_state

    assert parallel_ctx.backend == "nccl" and dist.get_backend() == "nccl"
    assert parallel_ctx.device == torch.device("cuda", 0) and parallel_ctx.world_size == 1
    values = torch.arange(4, dtype=torch.float32, device="cuda") + 1
    for group in (None, parallel_state.get_data_parallel_group(), parallel_state.get_tensor_model_parallel_group()):
        reduced = values.clone()
        dist.all_reduce(reduced, group=group)
        assert torch.equal(reduced, values)
    gathered = torch.empty(4, device="cuda")
    dist.all_gather_into_tensor(gathered, values)
    assert torch.equal(gathered, values)
    dist.barrier()


def test_cuda_path_installs_no_cpu_shims(parallel_ctx):
    from megatron.core.optimizer import distrib_optimizer, optimizer
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.tensor_parallel import random

    from llmforge.models import amp, cpu_compat

    chunks, megatron_optimizer, step = _trainer(parallel_ctx, "fp32")
    result = step(_batches(), 1e-3)
    assert result.applied and not result.nonfinite

    assert cpu_compat.install() is False and not cpu_compat._installed
    assert isinstance(torch.cuda.current_device(), int)
    assert "cuda" not in vars(torch.Tensor), "Tensor.cuda is patched"
    assert schedules.torch is torch, "the pipeline schedules see the CPU `torch` stand-in"
    assert type(random.get_cuda_rng_tracker()).__name__ != "CPURNGStatesTracker"
    wrapper_code = cpu_compat.on_cpu(lambda: None).__code__
    for klass in (optimizer.MegatronOptimizer, optimizer.FP32Optimizer, distrib_optimizer.DistributedOptimizer):
        wrapped = [name for name, attr in vars(klass).items() if getattr(attr, "__code__", None) is wrapper_code]
        assert not wrapped, f"{klass.__name__} methods run under CudaToCpuMode: {wrapped}"
    # megatron's own CUDA autocast replay in its linear backward is left alone on a GPU.
    assert "cuda" not in amp._autocast_devices

    assert all(p.is_cuda and p.dtype == torch.float32 for chunk in chunks for p in chunk.parameters())
    assert all(buffer.grad_data.is_cuda for chunk in chunks for buffer in chunk.buffers)
    states = [s for s in megatron_optimizer.optimizer.state.values() if s]
    assert states and all(t.is_cuda for s in states for t in s.values() if torch.is_tensor(t) and t.dim() > 0)


def test_bf16_autocast_with_flash_attention_learns(parallel_ctx):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from llmforge.models.init import unwrap

    seen: dict[str, torch.dtype] = {}

    def record_fc1_output(module, args, output) -> None:  # a hook returning a value would replace the output
        seen.setdefault("fc1_output", (output[0] if isinstance(output, tuple) else output).dtype)

    def record_attention_query(module, args) -> None:
        seen.setdefault("attention_query", args[0].dtype)

    chunks, _, step = _trainer(parallel_ctx, "bf16-autocast")
    layer = unwrap(chunks[0]).decoder.layers[0]
    layer.mlp.linear_fc1.register_forward_hook(record_fc1_output)
    layer.self_attention.core_attention.register_forward_pre_hook(record_attention_query)

    batches = _batches()
    # Only the flash kernel allowed: SDPA raises if it cannot use it for these shapes.
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        losses = [step(batches, 1e-3).loss for _ in range(8)]
    assert seen == {"fc1_output": torch.bfloat16, "attention_query": torch.bfloat16}
    assert all(p.dtype == torch.float32 for chunk in chunks for p in chunk.parameters()), "master weights stay fp32"
    assert all(buffer.grad_data.dtype == torch.float32 for chunk in chunks for buffer in chunk.buffers)
    assert losses[-1] < 0.85 * losses[0], losses

    _, _, fp32_step = _trainer(parallel_ctx, "fp32")
    fp32_first = fp32_step(batches, 1e-3).loss
    assert losses[0] == pytest.approx(fp32_first, rel=2e-2), "bf16 and fp32 start from the same weights"


def test_megatron_bf16_keeps_fp32_master_weights_and_grads_and_learns(parallel_ctx):
    chunks, megatron_optimizer, step = _trainer(parallel_ctx, "bf16")
    assert all(p.is_cuda and p.dtype == torch.bfloat16 for chunk in chunks for p in chunk.parameters())
    assert type(megatron_optimizer).__name__ == "Float16OptimizerWithFloat16Params"
    masters = [p for group in megatron_optimizer.optimizer.param_groups for p in group["params"]]
    assert masters and all(p.is_cuda and p.dtype == torch.float32 for p in masters)
    assert all(buffer.grad_data.dtype == torch.float32 for chunk in chunks for buffer in chunk.buffers)
    batches = _batches()
    losses = [step(batches, 1e-3).loss for _ in range(8)]
    assert losses[-1] < 0.85 * losses[0], losses
