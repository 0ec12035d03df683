"""Parameter and FLOP counts of the `gpt` model, against published sizes and their own splits."""

from __future__ import annotations

import pytest

from llmforge.models import size
from llmforge.spec.components import GPTModel
from llmforge.spec.schema import ParallelismConfig

LLAMA2_7B = dict(num_layers=32, hidden_size=4096, num_attention_heads=32, ffn_hidden_size=11008, vocab_size=32000, seq_length=4096,
                 normalization="RMSNorm", activation="swiglu", add_bias_linear=False, untie_embeddings_and_output_weights=True,
                 position_embedding_type="rope")
GPT2_124M = dict(num_layers=12, hidden_size=768, num_attention_heads=12, vocab_size=50257, seq_length=1024)


def layout(tp: int = 1, pp: int = 1) -> ParallelismConfig:
    return ParallelismConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, nproc_per_node=tp * pp)


def test_llama2_7b_has_exactly_its_published_parameter_count():
    assert size.param_count(GPTModel(**LLAMA2_7B)) == 6_738_415_616


def test_gpt2_124m_has_exactly_its_published_parameter_count():
    assert size.param_count(GPTModel(**GPT2_124M)) == 124_439_808


def test_grouped_query_attention_shrinks_only_the_key_value_projections():
    full, grouped = GPTModel(**LLAMA2_7B), GPTModel(**{**LLAMA2_7B, "num_query_groups": 8})
    head_dim = 4096 // 32
    saved_per_layer = 2 * 4096 * (32 - 8) * head_dim
    assert size.param_count(full) - size.param_count(grouped) == 32 * saved_per_layer


@pytest.mark.parametrize("shape", [LLAMA2_7B, GPT2_124M], ids=["llama", "gpt2"])
def test_pipeline_stages_add_up_to_the_total(shape):
    model = GPTModel(**{**shape, "vocab_size": 32000})
    per_stage = size.param_count_per_rank(model, layout(pp=4))
    # With tied embeddings the last stage holds its own copy of the word embedding.
    duplicate = 0 if model.untie_embeddings_and_output_weights else model.vocab_size * model.hidden_size
    assert sum(per_stage) - duplicate == size.param_count(model)
    assert per_stage[1] == per_stage[2] == model.num_layers // 4 * size.layer_params(model)


def test_tensor_parallel_splits_matrices_and_keeps_norms_and_row_biases_whole():
    model = GPTModel(**GPT2_124M)
    h, tp = model.hidden_size, 4
    one_rank = size.layer_params(model, tp)
    replicated = 2 * 2 * h + 2 * h  # two LayerNorms (weight + bias), proj and fc2 biases
    assert one_rank * tp - replicated * (tp - 1) == size.layer_params(model)


def test_llama_7b_tp2_pp2_rank_holds_a_quarter_of_the_layers_and_half_a_vocabulary():
    model = GPTModel(**LLAMA2_7B)
    first, last = size.param_count_per_rank(model, layout(tp=2, pp=2))
    layers = 16 * size.layer_params(model, 2)
    assert first == layers + 16000 * 4096
    assert last == layers + 16000 * 4096 + 4096  # output projection share + final RMSNorm


def test_flops_per_token_is_six_n_plus_the_causal_attention_term():
    model = GPTModel(**LLAMA2_7B)
    n = 6_738_415_616 - 32000 * 4096  # the input embedding lookup does no multiply-adds
    assert size.matmul_params(model) == n
    assert size.flops_per_token(model) == 6 * n + 6 * 32 * 4096 * 4096
    assert size.flops_per_token(model, seq_length=2048) == 6 * n + 6 * 32 * 4096 * 2048


def test_tied_output_projection_still_costs_flops():
    model = GPTModel(**GPT2_124M)
    # N = parameters − word and position lookups + the (tied) output projection.
    assert size.matmul_params(model) == 124_439_808 - 1024 * 768
