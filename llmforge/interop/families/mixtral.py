"""Mixtral (`MixtralForCausalLM`): Mistral's attention with every MLP a router over SwiGLU experts.

The experts are `intermediate_size` wide (Mixtral has no dense MLP); the router renormalises the
top k (`moe_router_pre_softmax: false`). On disk each expert is `block_sparse_moe.experts.{j}`
with `w1` (gate), `w3` (up) and `w2` (down), and the router `block_sparse_moe.gate`, as
Mixtral-8x7B's files and transformers' `save_pretrained` (4.x and 5.x) name them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from llmforge.interop.families import moe
from llmforge.interop.families.mistral import Mistral

if TYPE_CHECKING:
    from llmforge.interop.families.base import Link
    from llmforge.spec.components import GPTModel

EXPERTS = "num_local_experts"


class Mixtral(Mistral):
    name = "mixtral"
    hf_class = "MixtralForCausalLM"
    model_types = ("mixtral",)
    by_shape = True  # the only MoE family without q/k norms or a shared expert

    def own_problems(self, config: dict[str, Any]) -> list[str]:
        return super().own_problems(config) + moe.routing_problems(config, experts_key=EXPERTS, renormalises=True)

    def from_config(self, config: dict[str, Any], source: str) -> dict[str, Any]:
        return {**super().from_config(config, source), **moe.moe_options(config, experts_key=EXPERTS, renormalises=True)}

    def needs(self) -> dict[str, Any]:
        return {**{k: v for k, v in super().needs().items() if k != "num_moe_experts"},
                "moe_router_pre_softmax": False, "moe_shared_expert_intermediate_size": None}

    def misfits(self, model: GPTModel) -> list[str]:
        return moe.moe_misfits(model) + super().misfits(model)

    def to_config(self, model: GPTModel) -> dict[str, Any]:
        # intermediate_size is the experts' width: Mixtral has no dense MLP.
        return {**super().to_config(model), "intermediate_size": model.moe_ffn, EXPERTS: model.num_moe_experts,
                **moe.routing_config(model), "router_jitter_noise": 0.0}

    def mlp_links(self, model: GPTModel, layer: int) -> list[Link]:
        return moe.expert_links(model, layer, block="block_sparse_moe", names=("w1", "w3", "w2"))


FAMILY = Mixtral()
