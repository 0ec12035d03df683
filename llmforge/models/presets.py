"""Published model shapes as `gpt` model options (torch-free, so `plan` can use them).

Each preset is a plain dict of `llmforge.spec.components.GPTModel` keys; a spec can copy
one into its `model:` section, or a test can build a scaled-down twin with `shrink`.
"""

from __future__ import annotations

from typing import Any

PRESETS: dict[str, dict[str, Any]] = {
    # GPT-2 small (124M): LayerNorm, tanh-GELU, learned positions, tied embeddings, biases.
    "gpt2-124m": {
        "num_layers": 12,
        "hidden_size": 768,
        "num_attention_heads": 12,
        "ffn_hidden_size": 3072,
        "vocab_size": 50257,
        "seq_length": 1024,
        "position_embedding_type": "learned_absolute",
        "normalization": "LayerNorm",
        "norm_epsilon": 1e-5,
        "activation": "gelu_tanh",
        "add_bias_linear": True,
        "untie_embeddings_and_output_weights": False,
        "init_method_std": 0.02,
    },
    # Llama-2-7B: RMSNorm, SwiGLU, RoPE, untied embeddings, no biases.
    "llama2-7b": {
        "num_layers": 32,
        "hidden_size": 4096,
        "num_attention_heads": 32,
        "num_query_groups": 32,
        "ffn_hidden_size": 11008,
        "vocab_size": 32000,
        "seq_length": 4096,
        "position_embedding_type": "rope",
        "rotary_base": 10000,
        "normalization": "RMSNorm",
        "norm_epsilon": 1e-5,
        "activation": "swiglu",
        "add_bias_linear": False,
        "untie_embeddings_and_output_weights": True,
        "init_method_std": 0.02,
    },
}


def preset(name: str, **overrides: Any) -> dict[str, Any]:
    """A copy of a preset's options with `overrides` applied."""
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    return {**PRESETS[name], **overrides}


def shrink(name: str, **overrides: Any) -> dict[str, Any]:
    """The preset's architecture at toy size (2 layers, hidden 64) for tests: every switch kept."""
    small = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "vocab_size": 256, "seq_length": 32, **overrides}
    full = PRESETS[name]
    small.setdefault("ffn_hidden_size", small["hidden_size"] * full["ffn_hidden_size"] // full["hidden_size"])
    small.setdefault("num_query_groups", None)
    return preset(name, **small)
