"""The MoE keys of the `gpt` model and the expert layout: what validate accepts, and each refusal at the key to change."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
MOE = (ROOT / "specs" / "moe-tiny.yaml").read_text()  # 8 experts, top-2, no biases, 4 layers
EP2 = ("parallelism.expert_model_parallel_size=2", "parallelism.nproc_per_node=2")


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        list(EP2),
        [*EP2, "model.moe_token_dispatcher_type=allgather"],
        ["parallelism.expert_model_parallel_size=2", "parallelism.tensor_model_parallel_size=2", "parallelism.sequence_parallel=true",
         "parallelism.nproc_per_node=4"],
        [*EP2, "parallelism.pipeline_model_parallel_size=2", "parallelism.nproc_per_node=4"],
        [*EP2, "parallelism.use_distributed_optimizer=true"],
        ["model.moe_router_topk=1", "model.moe_router_pre_softmax=true"],
        ["model.moe_shared_expert_intermediate_size=512", "model.moe_layer_freq=2", "model.moe_expert_capacity_factor=1.25"],
        ["model.moe_router_load_balancing_type=seq_aux_loss"],
    ],
    ids=lambda o: " ".join(o) or "moe-tiny",
)
def test_moe_layouts_validate(write_spec, cli, overrides):
    code, _, err = cli("validate", write_spec(MOE), "--skip-inputs", *overrides)
    assert code == 0, err


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["parallelism.expert_model_parallel_size=3", "parallelism.nproc_per_node=3"],
         "parallelism.expert_model_parallel_size: num_moe_experts 8 is not divisible by expert_model_parallel_size 3"),
        (["model.moe_router_topk=9"], "model.moe_router_topk: moe_router_topk 9 routes each token to more experts than num_moe_experts 8"),
        (["model.moe_router_topk=1"], "model.moe_router_topk: top-1 routing with moe_router_pre_softmax false"),
        (["parallelism.expert_model_parallel_size=2"],
         "world size nnodes × nproc_per_node = 1 is not divisible by expert tensor × expert × pipeline parallel = 1 × 2 × 1 = 2"),
        (["parallelism.tensor_model_parallel_size=2", "parallelism.expert_tensor_parallel_size=2", "parallelism.sequence_parallel=true",
          "parallelism.nproc_per_node=2", "model.moe_ffn_hidden_size=255"],
         "model.moe_ffn_hidden_size: the experts' MLP width 255 is not divisible by expert_tensor_parallel_size 2"),
        (["parallelism.tensor_model_parallel_size=2", "parallelism.sequence_parallel=true", "parallelism.nproc_per_node=2",
          "model.moe_shared_expert_intermediate_size=255"],
         "model.moe_shared_expert_intermediate_size: moe_shared_expert_intermediate_size 255 is not divisible by tensor_model_parallel_size 2"),
        (["parallelism.tensor_model_parallel_size=2", "parallelism.nproc_per_node=2"],
         "parallelism.sequence_parallel: MoE layers with tensor_model_parallel_size > 1 need sequence_parallel"),
        (["model.add_bias_linear=true"], "model.add_bias_linear: MoE experts and shared experts take no biases here"),
        (["model.num_moe_experts=null"], "model.moe_ffn_hidden_size: moe_ffn_hidden_size describes MoE layers, but num_moe_experts is null"),
    ],
)
def test_moe_contradictions_are_refused_at_the_key(write_spec, cli, overrides, message):
    code, _, err = cli("validate", write_spec(MOE), "--skip-inputs", *overrides)
    assert code == 2 and message in err, err


def test_a_dense_model_refuses_expert_parallelism(write_spec, cli):
    tiny = (ROOT / "specs" / "tiny.yaml").read_text()
    code, _, err = cli("validate", write_spec(tiny), "--skip-inputs", *EP2)
    assert code == 2 and "parallelism.expert_model_parallel_size: parallelism.expert_model_parallel_size 2 splits experts" in err, err
