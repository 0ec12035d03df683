"""precision: fp8 on a GPU with TransformerEngine: TE layers, megatron's FP8 recipe, bf16 weights, a loss that follows bf16's.

Skipped without CUDA or without TransformerEngine (the H200 lent so far has no TE, and its
wheel is too large to carry there): benchmarks/gpu_check.py then records `fp8: skipped`.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from tests.gpu.test_cuda_path import SMALL, _batches

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(importlib.util.find_spec("transformer_engine") is None, reason="needs TransformerEngine (pip install -e '.[gpu]')"),
]

SEQ, MICRO_BATCH = 128, 4
FP8 = {"fp8": "hybrid", "fp8_recipe": "delayed", "fp8_margin": 0, "fp8_amax_history_len": 16, "fp8_amax_compute_algo": "max",
       "fp8_wgrad": True}


def _trainer(ctx, precision: str, fp8=None):
    from llmforge.models.gpt import build_gpt
    from llmforge.runtime.optim import build_adamw, wrap_optimizer
    from llmforge.runtime.step import TrainStep
    from llmforge.spec.components import AdamW, GPTModel
    from llmforge.spec.schema import ParallelismConfig

    parallelism = ParallelismConfig()
    chunks = build_gpt(GPTModel(**SMALL), parallelism, precision=precision, seed=1234, fp8=fp8)
    optimizer = wrap_optimizer(build_adamw(AdamW(lr=1e-3, weight_decay=0.0), model_chunks=chunks), chunks, parallelism)
    step = TrainStep(chunks, optimizer, parallelism_ctx=ctx, seq_length=SEQ, micro_batch_size=MICRO_BATCH, precision=precision, clip_grad=1.0)
    return chunks, optimizer, step


def test_fp8_runs_te_layers_in_fp8_with_bf16_weights_and_follows_bf16(parallel_ctx):
    from megatron.core.utils import get_model_config

    from llmforge.models.init import unwrap

    chunks, optimizer, step = _trainer(parallel_ctx, "fp8", FP8)
    config = get_model_config(chunks[0])
    assert config.fp8 == "hybrid" and config.fp8_amax_history_len == 16 and config.bf16
    layer = unwrap(chunks[0]).decoder.layers[0]
    assert type(layer.self_attention.linear_qkv).__module__.startswith("megatron.core.extensions.transformer_engine")
    assert all(p.dtype == torch.bfloat16 for chunk in chunks for p in chunk.parameters())
    assert type(optimizer).__name__ == "Float16OptimizerWithFloat16Params"

    batches = _batches()
    losses = [step(batches, 1e-3).loss for _ in range(8)]
    _, _, bf16_step = _trainer(parallel_ctx, "bf16")
    bf16_losses = [bf16_step(batches, 1e-3).loss for _ in range(8)]
    assert losses[-1] < 0.85 * losses[0], losses
    # Same weights, FP8 rounding of each GEMM's inputs: the curves stay within a few percent.
    assert max(abs(a - b) / b for a, b in zip(losses, bf16_losses)) < 0.05, (losses, bf16_losses)
    # The amax history was filled: FP8 ran, not a silent bf16 fallback.
    meta = layer.self_attention.linear_qkv.fp8_meta
    assert meta and any(float(m.amax_history.abs().max()) > 0 for k, m in meta.items() if hasattr(m, "amax_history"))


def test_serving_runs_without_fp8_and_restores_it(parallel_ctx):
    """Generation's one-token forwards are shapes FP8 GEMMs refuse: ModelServer serves in bf16."""
    from megatron.core.utils import get_model_config

    from llmforge.runtime.serve import ModelServer
    from llmforge.runtime.step import serving_context

    chunks, _, _ = _trainer(parallel_ctx, "fp8", FP8)
    server = ModelServer(chunks, autocast=serving_context("fp8", torch.device("cuda"), chunks))
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]  # 3 and 5 tokens: not multiples of 16
    out = server.generate(prompts, max_new_tokens=4)
    assert len(out) == 2 and get_model_config(chunks[0]).fp8 == "hybrid"
