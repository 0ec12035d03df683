"""Mistral (`MistralForCausalLM`): the Llama layout without biases, full causal attention only.

Mistral 7B v0.1 attends within a 4096-token sliding window; v0.2 and v0.3 dropped it
(`sliding_window: null`), and those are what llmforge computes. Llama computes the same, so an
export picks Mistral only from an import record, never from the shape.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from llmforge.interop.families.llama import Llama

if TYPE_CHECKING:
    from llmforge.spec.components import GPTModel


class Mistral(Llama):
    name = "mistral"
    hf_class = "MistralForCausalLM"
    model_types = ("mistral",)
    by_shape = False

    def own_problems(self, config: dict[str, Any]) -> list[str]:
        out = []
        if config.get("sliding_window") is not None:
            out.append(f"sliding_window {config['sliding_window']} (must be null: llmforge's attention is full causal, "
                       "as Mistral v0.2 and v0.3 have it)")
        return out

    def switches(self, config: dict[str, Any]) -> dict[str, Any]:
        return {"add_bias_linear": False}

    def needs(self) -> dict[str, Any]:
        return {**super().needs(), "add_bias_linear": False}

    def own_config(self, model: GPTModel) -> dict[str, Any]:
        return {"sliding_window": None}


FAMILY = Mistral()
