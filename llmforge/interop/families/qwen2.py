"""Qwen2 and Qwen2.5 (`Qwen2ForCausalLM`): the Llama layout with a bias on q, k and v alone.

megatron's `add_qkv_bias` is exactly that bias (on the fused `linear_qkv`; `add_bias_linear`
stays false). Qwen2 can attend within a sliding window on its upper layers; the published
models switch it off (`use_sliding_window: false`), and llmforge computes only that.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from llmforge.interop.families.llama import Llama

if TYPE_CHECKING:
    from llmforge.spec.components import GPTModel


def sliding_window_problems(config: dict[str, Any]) -> list[str]:
    """Qwen's switch for the sliding window (`sliding_window` itself is ignored while it is off)."""
    if config.get("use_sliding_window", False):
        return ["use_sliding_window true (must be false: llmforge's attention is full causal)"]
    return []


class Qwen2(Llama):
    name = "qwen2"
    hf_class = "Qwen2ForCausalLM"
    model_types = ("qwen2",)

    def own_problems(self, config: dict[str, Any]) -> list[str]:
        return sliding_window_problems(config)

    def switches(self, config: dict[str, Any]) -> dict[str, Any]:
        return {"add_bias_linear": False, "add_qkv_bias": True}

    def needs(self) -> dict[str, Any]:
        return {**super().needs(), "add_bias_linear": False, "add_qkv_bias": True}

    def own_config(self, model: GPTModel) -> dict[str, Any]:
        return {"use_sliding_window": False, "sliding_window": None, "max_window_layers": model.num_layers}


FAMILY = Qwen2()
