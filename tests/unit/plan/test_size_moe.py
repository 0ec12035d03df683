"""An MoE model's counts: total and active parameters, experts sharded over EP, FLOPs from the active ones, memory per rank."""

from __future__ import annotations

import pytest

from llmforge.models import size
from llmforge.plan.memory import Layout, memory_per_rank
from llmforge.spec.components import AdamW, GPTModel
from llmforge.spec.schema import ParallelismConfig

MIXTRAL = dict(num_layers=32, hidden_size=4096, num_attention_heads=32, num_query_groups=8, ffn_hidden_size=14336, vocab_size=32000,
               seq_length=4096, normalization="RMSNorm", activation="swiglu", add_bias_linear=False, untie_embeddings_and_output_weights=True,
               position_embedding_type="rope", num_moe_experts=8, moe_router_topk=2)
EXPERT = 3 * 4096 * 14336  # gate, up and down projections of one expert


def test_mixtral_total_and_active_counts():
    model = GPTModel(**MIXTRAL)
    assert size.param_count(model) == 46_702_792_704
    assert size.active_param_count(model) == 12_879_925_248
    assert size.param_count(model) - size.active_param_count(model) == 32 * 6 * EXPERT


def test_flops_per_token_come_from_the_active_parameters():
    model = GPTModel(**MIXTRAL)
    dense = GPTModel(**{**MIXTRAL, "num_moe_experts": None, "moe_router_topk": 2, "ffn_hidden_size": 2 * 14336})
    # Two experts per token do a 2 × 14336-wide MLP's work, plus the router's 8 × 4096 per layer.
    assert size.flops_per_token(model) == size.flops_per_token(dense) + 6 * 32 * 8 * 4096


def test_experts_shard_over_expert_parallel_ranks():
    model = GPTModel(**MIXTRAL)
    whole = size.param_count_per_rank(model, ParallelismConfig(pipeline_model_parallel_size=4, nproc_per_node=4))
    ep8 = size.param_count_per_rank(model, ParallelismConfig(pipeline_model_parallel_size=4, expert_model_parallel_size=8, nproc_per_node=32))
    assert [w - e for w, e in zip(whole, ep8)] == [8 * 7 * EXPERT] * 4
    assert size.expert_param_count_per_rank(model, ParallelismConfig(pipeline_model_parallel_size=4, expert_model_parallel_size=8,
                                                                     nproc_per_node=32)) == [8 * EXPERT] * 4
    # Expert TP splits each expert; attention keeps TP.
    etp = ParallelismConfig(tensor_model_parallel_size=2, sequence_parallel=True, expert_tensor_parallel_size=1, nproc_per_node=2)
    assert size.expert_param_count_per_rank(model, etp) == [32 * 8 * EXPERT]


def test_moe_layer_freq_alternates_dense_and_moe_layers():
    model = GPTModel(**{**MIXTRAL, "moe_layer_freq": 2})
    dense, moe = size.layer_params(model, layer=1), size.layer_params(model, layer=0)
    assert moe - dense == 8 * EXPERT + 8 * 4096 - EXPERT
    assert size.moe_layers(model) == 16


def test_the_distributed_optimizer_shards_expert_state_over_expert_replicas():
    model = GPTModel(**MIXTRAL)
    spec = ParallelismConfig(pipeline_model_parallel_size=4, expert_model_parallel_size=8, use_distributed_optimizer=True, nnodes=8,
                             nproc_per_node=8)
    layout = Layout.from_spec(spec)
    assert (layout.data, layout.expert_data) == (16, 2)
    rank = memory_per_rank(model, layout, precision="bf16", optimizer=AdamW())[1]
    experts = size.expert_param_count_per_rank(model, layout)[1]
    dense = rank.params - experts
    assert rank.optimizer_states == pytest.approx(dense * 12 / 16 + experts * 12 / 2, rel=1e-6)
