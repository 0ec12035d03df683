"""Qwen3 dense (`Qwen3ForCausalLM`): the Llama layout with RMSNorm on each head's query and key.

megatron's `qk_layernorm` normalizes every head over its `kv_channels` with one weight shared by
all heads, before RoPE, as Qwen3's `q_norm`/`k_norm` do. Qwen3's heads are wider than
hidden_size / num_attention_heads (0.6B: 1024 wide, 16 heads of 128): `kv_channels`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from llmforge.interop.families.llama import Llama
from llmforge.interop.families.qwen2 import sliding_window_problems

if TYPE_CHECKING:
    from llmforge.spec.components import GPTModel


class Qwen3(Llama):
    name = "qwen3"
    hf_class = "Qwen3ForCausalLM"
    model_types = ("qwen3",)
    default_head_dim = 128  # Qwen3Config's default when config.json leaves head_dim out

    def own_problems(self, config: dict[str, Any]) -> list[str]:
        out = []
        if config.get("attention_bias", False):
            out.append("attention_bias true (biases on q, k, v and o but not the MLP: megatron has a bias on QKV alone "
                       "or on every linear)")
        return out + sliding_window_problems(config)

    def switches(self, config: dict[str, Any]) -> dict[str, Any]:
        return {"add_bias_linear": False, "qk_layernorm": True}

    def needs(self) -> dict[str, Any]:
        return {**super().needs(), "add_bias_linear": False, "qk_layernorm": True}

    def own_config(self, model: GPTModel) -> dict[str, Any]:
        return {"attention_bias": False, "use_sliding_window": False, "sliding_window": None, "max_window_layers": model.num_layers}


FAMILY = Qwen3()
