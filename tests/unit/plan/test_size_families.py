"""Counts for the family switches: what each adds, and how tensor parallelism splits it."""

from __future__ import annotations

from llmforge.models import size
from llmforge.spec.components import GPTModel

QWEN3_8B = dict(num_layers=36, hidden_size=4096, num_attention_heads=32, num_query_groups=8, kv_channels=128, ffn_hidden_size=12288,
                vocab_size=151936, seq_length=4096, position_embedding_type="rope", normalization="RMSNorm", activation="swiglu",
                add_bias_linear=False, qk_layernorm=True, untie_embeddings_and_output_weights=True)
SMALL = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=96, vocab_size=256, seq_length=16,
             position_embedding_type="rope", normalization="RMSNorm", activation="swiglu", add_bias_linear=False)


def test_qk_layernorm_adds_one_head_wide_norm_for_queries_and_one_for_keys_per_layer():
    plain, normed = GPTModel(**SMALL), GPTModel(**SMALL, qk_layernorm=True)
    assert size.param_count(normed) - size.param_count(plain) == 2 * 2 * 16
    assert size.layer_tensors(normed) - size.layer_tensors(plain) == 2
    as_layernorm = GPTModel(**{**SMALL, "normalization": "LayerNorm"}, qk_layernorm=True)
    assert size.layer_params(as_layernorm) - size.layer_params(GPTModel(**{**SMALL, "normalization": "LayerNorm"})) == 2 * 2 * 16


def test_add_qkv_bias_biases_the_fused_projection_only():
    plain, biased = GPTModel(**SMALL), GPTModel(**SMALL, add_qkv_bias=True)
    assert size.layer_params(biased) - size.layer_params(plain) == (4 + 2 * 2) * 16
    assert size.layer_tensors(biased) - size.layer_tensors(plain) == 1


def test_kv_channels_sets_the_width_of_attention_not_of_the_model():
    wide = GPTModel(**SMALL, kv_channels=24)
    qkv, proj = 64 * (4 + 2 * 2) * 24, 4 * 24 * 64
    assert size.layer_params(wide) - size.layer_params(GPTModel(**SMALL)) == qkv + proj - (64 * 8 * 16 + 64 * 64)
    assert size.attention_flops_per_token(wide) == 6 * 2 * (4 * 24) * 16
    assert size.embedding_params(wide) == 256 * 64


def test_tensor_parallel_splits_the_qkv_bias_and_keeps_the_qk_norms_whole():
    model = GPTModel(**QWEN3_8B)
    one_rank = size.layer_params(model, 8)
    replicated = 2 * 4096 + 2 * 128  # the two layer norms and the q/k norms
    assert one_rank * 8 - replicated * 7 == size.layer_params(model)
    qwen2 = GPTModel(**{**QWEN3_8B, "qk_layernorm": False, "add_qkv_bias": True})
    assert size.layer_params(qwen2, 8) * 8 - 2 * 4096 * 7 == size.layer_params(qwen2)
