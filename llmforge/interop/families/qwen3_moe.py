"""Qwen3-MoE (`Qwen3MoeForCausalLM`, Qwen3-30B-A3B, Qwen3-235B-A22B): Qwen3's attention, every MLP routed.

`moe_intermediate_size` is the experts' width, `intermediate_size` the dense MLP's (unused while
every layer is sparse, kept for the round trip); `norm_topk_prob` (true in the published models)
renormalises the top k, false keeps the softmax over all experts (`moe_router_pre_softmax`).
transformers 5 writes the expert count as `num_local_experts`, 4.x and the published files as
`num_experts`: both are read, `num_experts` is written (5.x maps it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from llmforge.interop.families import moe
from llmforge.interop.families.qwen3 import Qwen3

if TYPE_CHECKING:
    from llmforge.interop.families.base import Link
    from llmforge.spec.components import GPTModel


def experts_key(config: dict[str, Any]) -> str:
    """The key a Qwen MoE config counts its experts under (4.x and the hub: num_experts; 5.x: num_local_experts)."""
    return "num_experts" if "num_experts" in config or "num_local_experts" not in config else "num_local_experts"


class Qwen3Moe(Qwen3):
    name = "qwen3_moe"
    hf_class = "Qwen3MoeForCausalLM"
    model_types = ("qwen3_moe",)

    def own_problems(self, config: dict[str, Any]) -> list[str]:
        renormalises = bool(config.get("norm_topk_prob", False))
        return super().own_problems(config) + moe.routing_problems(config, experts_key=experts_key(config), renormalises=renormalises)

    def from_config(self, config: dict[str, Any], source: str) -> dict[str, Any]:
        options = super().from_config(config, source)
        routing = moe.moe_options(config, experts_key=experts_key(config), renormalises=bool(config.get("norm_topk_prob", False)))
        return {**options, **routing, "moe_ffn_hidden_size": config.get("moe_intermediate_size") or options["ffn_hidden_size"]}

    def needs(self) -> dict[str, Any]:
        return {**{k: v for k, v in super().needs().items() if k != "num_moe_experts"}, "moe_shared_expert_intermediate_size": None}

    def misfits(self, model: GPTModel) -> list[str]:
        return moe.moe_misfits(model) + super().misfits(model)

    def to_config(self, model: GPTModel) -> dict[str, Any]:
        return {**super().to_config(model), "moe_intermediate_size": model.moe_ffn, "num_experts": model.num_moe_experts,
                "norm_topk_prob": not model.moe_router_pre_softmax, "decoder_sparse_step": 1, "mlp_only_layers": [],
                **moe.routing_config(model)}

    def mlp_links(self, model: GPTModel, layer: int) -> list[Link]:
        return moe.expert_links(model, layer, block="mlp", names=("gate_proj", "up_proj", "down_proj"))


FAMILY = Qwen3Moe()
