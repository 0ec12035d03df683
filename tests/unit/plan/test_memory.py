"""The memory model's behaviour: what each parallelism and recompute option saves, and where."""

from __future__ import annotations

import pytest

from llmforge.plan.memory import FP32, Layout, in_flight, memory_per_rank, rank_memory
from llmforge.registry.manager import get_registry
from llmforge.spec.components import GPTModel

LLAMA_1B = GPTModel(num_layers=16, hidden_size=2048, num_attention_heads=16, num_query_groups=4, ffn_hidden_size=5632,
                    vocab_size=128000, seq_length=2048, normalization="RMSNorm", activation="swiglu", add_bias_linear=False,
                    untie_embeddings_and_output_weights=True, position_embedding_type="rope")


def optimizer(name: str = "adamw", **options):
    """The optimizer's options as a validated spec holds them (with their `name`)."""
    return get_registry().get("optimizer", name).typed_options(name=name, **options)


def layout(**kw) -> Layout:
    base = dict(tensor=1, pipeline=1, virtual=1, data=1, sequence_parallel=False, recompute="none", distributed_optimizer=False,
                micro_batch_size=2, global_batch_size=64, nnodes=1, nproc_per_node=1)
    base.update(kw)
    base["nproc_per_node"] = max(base["nproc_per_node"], base["tensor"] * base["pipeline"] * base["data"])
    return Layout(**base)


def peak(lay: Layout, precision: str = "bf16", opt=None, model=LLAMA_1B) -> list:
    return memory_per_rank(model, lay, precision=precision, optimizer=opt or optimizer())


@pytest.mark.parametrize("precision", ["fp32", "bf16-autocast"])
def test_fp32_weights_gradients_and_adam_states_are_4_4_and_8_bytes_per_parameter(precision):
    rank = peak(layout(), precision)[0]
    assert rank.weights == rank.gradients == rank.params * FP32
    tensors_step_bytes = rank.optimizer_states - 8 * rank.params
    assert 0 < tensors_step_bytes < 1000  # one fp32 `step` scalar per parameter tensor


def test_megatron_bf16_is_2_weight_4_gradient_and_12_optimizer_bytes_sharded_over_data_parallel():
    rank = peak(layout(), "bf16")[0]
    assert rank.weights == 2 * rank.params and rank.gradients == 4 * rank.params
    assert 0 < rank.optimizer_states - 12 * rank.params < 1000  # fp32 master weights + exp_avg + exp_avg_sq, and the steps
    sharded = peak(layout(data=8, distributed_optimizer=True), "bf16")[0]
    assert sharded.weights == rank.weights and sharded.gradients == rank.gradients
    assert sharded.optimizer_states == pytest.approx(rank.optimizer_states / 8, abs=8)


def test_bf16_autocast_keeps_fp32_weights_but_halves_much_of_the_activations():
    fp32, autocast = peak(layout(), "fp32")[0], peak(layout(), "bf16-autocast")[0]
    assert fp32.weights == autocast.weights
    assert 0.45 < autocast.activations / fp32.activations < 0.8  # norms keep fp32 copies


def test_megatron_bf16_activations_are_bf16_where_autocast_is_promoted_by_biases():
    gpt = GPTModel(**{**LLAMA_1B.model_dump(), "add_bias_linear": True})
    autocast, bf16 = peak(layout(), "bf16-autocast", model=gpt)[0], peak(layout(), "bf16", model=gpt)[0]
    assert bf16.activations < 0.8 * autocast.activations  # residual stream and linear outputs stay bf16
    assert peak(layout(), "bf16")[0].activations <= peak(layout(), "bf16-autocast")[0].activations


def test_distributed_optimizer_shards_only_the_optimizer_states():
    plain, sharded = peak(layout(data=8))[0], peak(layout(data=8, distributed_optimizer=True))[0]
    assert sharded.weights == plain.weights and sharded.gradients == plain.gradients
    assert sharded.optimizer_states == pytest.approx(plain.optimizer_states / 8, abs=8)


def test_only_adamw_is_sharded_by_the_distributed_optimizer():
    sgd = optimizer("sgd", momentum=0.9)
    plain, sharded = peak(layout(data=8), opt=sgd)[0], peak(layout(data=8, distributed_optimizer=True), opt=sgd)[0]
    assert sharded.optimizer_states == plain.optimizer_states  # llmforge.runtime keeps SGD's state whole


@pytest.mark.parametrize("precision, master", [("fp32", 0), ("bf16", 4)])
@pytest.mark.parametrize("momentum, state", [(0.9, 4), (0.0, 0)])
def test_sgd_keeps_a_momentum_buffer_only_with_momentum(momentum, state, precision, master):
    rank = peak(layout(), precision, opt=optimizer("sgd", momentum=momentum))[0]
    assert rank.optimizer_states == (state + master) * rank.params


def test_activations_grow_linearly_with_the_micro_batch():
    one, four = peak(layout(micro_batch_size=1))[0], peak(layout(micro_batch_size=4))[0]
    assert four.activations == pytest.approx(4 * one.activations, rel=0.01)  # RoPE tables do not grow
    assert four.logits == pytest.approx(4 * one.logits, rel=1e-3)


def test_recompute_trades_activations_for_a_one_layer_buffer():
    none, selective, full = (peak(layout(recompute=r))[0] for r in ("none", "selective", "full"))
    # With SDPA there are no s² scores: selective recompute saves only the log-sum-exp.
    assert 0.97 * none.activations < selective.activations < none.activations
    assert full.activations < none.activations / 10
    assert none.recompute_buffer == 0 and full.recompute_buffer > 0
    assert full.recompute_buffer < none.activations / LLAMA_1B.num_layers * 1.01


def test_sequence_parallel_divides_what_tensor_parallel_leaves_replicated():
    tp1 = peak(layout())[0].activations
    tp4 = peak(layout(tensor=4))[0].activations
    tp4_sp = peak(layout(tensor=4, sequence_parallel=True))[0].activations
    assert tp4_sp < tp4 < tp1
    assert tp4_sp == pytest.approx(tp1 / 4, rel=0.02)  # Korthikanti: with SP everything is split


def test_big_vocabulary_logits_sit_on_the_last_stage_and_split_over_tensor_parallel():
    first, last = peak(layout(pipeline=4))[0], peak(layout(pipeline=4))[-1]
    assert first.logits == 0 and last.logits > 0
    tokens = 2 * 2048  # micro batch × seq
    softmax = tokens * 128000 * FP32
    # The final RMSNorm keeps an fp32 input copy and rstd (on CUDA; the CPU's also the normalized
    # input); the output layer keeps its bf16 input; the loss a target mask and the masked targets.
    final_norm = tokens * 2048 * (4 + 2) + tokens * 4
    assert last.logits == softmax + final_norm + tokens * (1 + 8)
    assert peak(layout(pipeline=4, tensor=2))[-1].logits == softmax / 2 + final_norm + tokens * (1 + 8)
    # Beside the kept softmax, megatron's in-place cross entropy leaves only the bf16 logits on CUDA.
    assert last.loss_workspace == tokens * 128000 * 2
    on_cpu = rank_memory(LLAMA_1B, layout(pipeline=4), 3, precision="bf16", optimizer=optimizer(), device="cpu")
    assert on_cpu.logits - last.logits == tokens * 2048 * 4 and on_cpu.loss_workspace == tokens * 128000 * (4 + 2)


def test_one_f_one_b_keeps_pp_minus_stage_micro_batches_in_flight():
    lay = layout(pipeline=4, global_batch_size=64)
    assert [in_flight(lay, s) for s in range(4)] == [4, 3, 2, 1]
    assert [r.in_flight_microbatches for r in peak(lay)] == [4, 3, 2, 1]
    # Never more than the step has.
    assert in_flight(layout(pipeline=4, global_batch_size=4, micro_batch_size=2), 0) == 2


def test_interleaving_holds_more_in_flight_on_the_first_stage():
    plain = layout(pipeline=4, global_batch_size=64)
    interleaved = layout(pipeline=4, virtual=2, global_batch_size=64)
    # Korthikanti et al.: the first stage holds (1 + (pp − 1) / (pp · v)) × the 1F1B amount.
    ratio = rank_memory(LLAMA_1B, interleaved, 0, precision="bf16", optimizer=optimizer()).activations / \
        rank_memory(LLAMA_1B, plain, 0, precision="bf16", optimizer=optimizer()).activations
    assert ratio == pytest.approx(1 + 3 / 8, rel=0.01)


def test_cpu_attention_dropout_stores_the_score_matrix():
    dropout = GPTModel(**{**LLAMA_1B.model_dump(), "attention_dropout": 0.1})
    on_gpu = rank_memory(dropout, layout(), 0, precision="bf16", optimizer=optimizer(), device="cuda").activations
    on_cpu = rank_memory(dropout, layout(), 0, precision="bf16", optimizer=optimizer(), device="cpu").activations
    scores = 16 * 3 * 2 * 16 * 2048 * 2048 * FP32  # layers × (softmax, mask, dropped) × batch × heads × s²
    # The CPU's RMSNorms also keep their normalized input: two per layer.
    normalized = 16 * 2 * 2 * 2048 * 2048 * FP32
    assert on_cpu - on_gpu == pytest.approx(scores + normalized, rel=0.05)
