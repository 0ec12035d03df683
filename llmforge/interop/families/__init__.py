"""The Hugging Face model families llmforge converts, one module each (`base.Family`).

Adding a family (Gemma, Phi, ...) is a new module with a `FAMILY` and a row in `FAMILIES`,
plus a row of tests. Torch-free: `validate` and `plan` may read these tables.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from llmforge.interop.families import gpt2, llama, mistral, mixtral, qwen2, qwen2_moe, qwen3, qwen3_moe
from llmforge.interop.families.base import Family
from llmforge.spec.errors import UserError

if TYPE_CHECKING:
    from llmforge.spec.components import GPTModel

FAMILIES: dict[str, Family] = {f.name: f for f in (llama.FAMILY, mistral.FAMILY, qwen2.FAMILY, qwen3.FAMILY, gpt2.FAMILY, mixtral.FAMILY,
                                                   qwen2_moe.FAMILY, qwen3_moe.FAMILY)}


def _supported() -> str:
    return ", ".join(f"{f.model_types[0]} ({f.hf_class})" for f in FAMILIES.values())


def family_of_config(config: dict[str, Any], source: str) -> Family:
    """The family an HF `config.json` belongs to (by `model_type`, else `architectures`); UserError for any other."""
    for family in FAMILIES.values():
        if family.identifies(config):
            return family
    archs = config.get("architectures") or []
    shown = config.get("model_type") or (archs[0] if archs else None)
    raise UserError(f"{source}: model_type {shown!r} is not supported", f"llmforge imports {_supported()}")


def family_of_model(model: GPTModel) -> Family:
    """The family whose HF class computes exactly what `model` computes, from its shape alone; UserError if none does."""
    candidates = [f for f in FAMILIES.values() if f.by_shape]
    misfits = {f: f.misfits(model) for f in candidates}
    for family, problems in misfits.items():
        if not problems:
            return family
    why = "; ".join(f"{f.hf_class}: {', '.join(p)}" for f, p in misfits.items())
    raise UserError(f"model matches no Hugging Face architecture llmforge exports — {why}",
                    "export supports the Llama shape (rope, RMSNorm, swiglu; Qwen2 with add_qkv_bias, Qwen3 with qk_layernorm) "
                    "the GPT-2 shape (learned_absolute, LayerNorm, gelu_tanh, add_bias_linear: true), and the Llama shape with "
                    "experts on every layer (Mixtral; Qwen3-MoE with qk_layernorm; Qwen2-MoE with add_qkv_bias and a gated shared expert)")

