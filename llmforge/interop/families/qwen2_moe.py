"""Qwen2-MoE (`Qwen2MoeForCausalLM`, Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B): Qwen2's attention, routed
experts plus a shared expert every token goes through, scaled by a sigmoid gate of the token.

megatron's shared expert with `moe_shared_expert_gate` is exactly that: `shared_experts.linear_fc1`
/ `linear_fc2` are `mlp.shared_expert.gate_proj/up_proj/down_proj`, its `gate_weight` [1, hidden]
is `mlp.shared_expert_gate.weight`. The published models keep the softmax over all experts
(`norm_topk_prob: false`, so `moe_router_pre_softmax: true`). Expert counts and widths are read
as for Qwen3-MoE.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from llmforge.interop.families import moe
from llmforge.interop.families.base import matrix
from llmforge.interop.families.llama import gated_mlp
from llmforge.interop.families.qwen2 import Qwen2
from llmforge.interop.families.qwen3_moe import experts_key

if TYPE_CHECKING:
    from llmforge.interop.families.base import Link
    from llmforge.spec.components import GPTModel


class Qwen2Moe(Qwen2):
    name = "qwen2_moe"
    hf_class = "Qwen2MoeForCausalLM"
    model_types = ("qwen2_moe",)

    def own_problems(self, config: dict[str, Any]) -> list[str]:
        out = super().own_problems(config)
        if not config.get("qkv_bias", True):
            out.append("qkv_bias false (Qwen2-MoE's q, k and v have biases; transformers 4.x has no switch for them)")
        if not config.get("shared_expert_intermediate_size"):
            out.append(f"shared_expert_intermediate_size {config.get('shared_expert_intermediate_size')} (needs a shared expert)")
        renormalises = bool(config.get("norm_topk_prob", False))
        return out + moe.routing_problems(config, experts_key=experts_key(config), renormalises=renormalises)

    def from_config(self, config: dict[str, Any], source: str) -> dict[str, Any]:
        options = super().from_config(config, source)
        routing = moe.moe_options(config, experts_key=experts_key(config), renormalises=bool(config.get("norm_topk_prob", False)))
        return {**options, **routing, "moe_ffn_hidden_size": config.get("moe_intermediate_size") or options["ffn_hidden_size"],
                "moe_shared_expert_intermediate_size": config["shared_expert_intermediate_size"], "moe_shared_expert_gate": True}

    def needs(self) -> dict[str, Any]:
        return {**{k: v for k, v in super().needs().items() if k != "num_moe_experts"}, "moe_shared_expert_gate": True}

    def misfits(self, model: GPTModel) -> list[str]:
        return moe.moe_misfits(model) + super().misfits(model)

    def to_config(self, model: GPTModel) -> dict[str, Any]:
        return {**super().to_config(model), "moe_intermediate_size": model.moe_ffn, "num_experts": model.num_moe_experts,
                "shared_expert_intermediate_size": model.moe_shared_expert_intermediate_size, "qkv_bias": True,
                "norm_topk_prob": not model.moe_router_pre_softmax, "decoder_sparse_step": 1, "mlp_only_layers": [],
                **moe.routing_config(model)}

    def mlp_links(self, model: GPTModel, layer: int) -> list[Link]:
        m, h = f"decoder.layers.{layer}.mlp.", f"model.layers.{layer}.mlp."
        shared = model.moe_shared_expert_intermediate_size
        return [*moe.expert_links(model, layer, block="mlp", names=("gate_proj", "up_proj", "down_proj")),
                *gated_mlp(m + "shared_experts.", h + "shared_expert.", ("gate_proj", "up_proj", "down_proj"), model.hidden_size, shared),
                matrix(m + "shared_experts.gate_weight", h + "shared_expert_gate.weight", 1, model.hidden_size)]


FAMILY = Qwen2Moe()
