"""`config.json` ↔ the `gpt` model options, for the two HF architectures we convert.

Torch-free. A model is exported as `LlamaForCausalLM` when it has the Llama shape (RoPE,
RMSNorm, SwiGLU) and as `GPT2LMHeadModel` when it has the GPT-2 shape (learned positions,
LayerNorm, GELU, biases); anything else is refused with the fields that do not fit,
because a config that loads but computes something else is the worst outcome of all.
The configs we write carry both the transformers 4.x and 5.x spellings of the keys that
were renamed (`rope_theta`/`rope_parameters`, `torch_dtype`/`dtype`).
"""

from __future__ import annotations

from typing import Any, Literal

from llmforge.spec.components import GPTModel
from llmforge.spec.errors import UserError

Arch = Literal["llama", "gpt2"]
HF_CLASS: dict[Arch, str] = {"llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel"}
DTYPES = ("float32", "bfloat16", "float16")

# HF activation names → ours. gelu_new, gelu_pytorch_tanh and gelu_fast are all the tanh
# approximation GPT-2 was trained with; only the spelling of the formula differs.
_GPT2_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh", "gelu": "gelu"}
_EXPORT_ACTIVATION = {"gelu_tanh": "gelu_new", "gelu": "gelu"}

# What each architecture needs from the model options: field → the value (or values) it can represent.
_NEEDS: dict[Arch, dict[str, Any]] = {
    "llama": {"position_embedding_type": "rope", "normalization": "RMSNorm", "activation": "swiglu"},
    "gpt2": {"position_embedding_type": "learned_absolute", "normalization": "LayerNorm", "activation": ("gelu_tanh", "gelu"),
             "add_bias_linear": True},
}


def _fits(model: GPTModel, arch: Arch) -> list[str]:
    """The fields of `model` that `arch` cannot represent, as 'field X (needs Y)' strings."""
    misfits = []
    for name, need in _NEEDS[arch].items():
        have = getattr(model, name)
        ok = have in need if isinstance(need, tuple) else have == need
        if not ok:
            shown = " or ".join(map(str, need)) if isinstance(need, tuple) else need
            misfits.append(f"{name} {have} (needs {shown})")
    if arch == "gpt2" and model.kv_groups != model.num_attention_heads:
        misfits.append(f"num_query_groups {model.kv_groups} (GPT-2 has no grouped-query attention)")
    return misfits


def architecture_of(model: GPTModel) -> Arch:
    """The HF architecture that computes exactly what `model` computes; UserError if none does."""
    misfits = {arch: _fits(model, arch) for arch in HF_CLASS}
    for arch, problems in misfits.items():
        if not problems:
            return arch
    why = "; ".join(f"{HF_CLASS[a]}: {', '.join(p)}" for a, p in misfits.items())
    raise UserError(f"model matches no Hugging Face architecture llmforge exports — {why}",
                    "export supports the Llama shape (rope, RMSNorm, swiglu) and the GPT-2 shape "
                    "(learned_absolute, LayerNorm, gelu_tanh, add_bias_linear: true)")


def to_hf_config(model: GPTModel, *, token_ids: dict[str, int | None], dtype: str) -> dict[str, Any]:
    """The `config.json` of the HF model equal to `model`.

    Args:
        token_ids: {"bos", "eos", "pad"} → id or None, from the run's tokenizer.
        dtype: the dtype the weights are written in.
    """
    arch = architecture_of(model)
    ids = {f"{role}_token_id": token_ids.get(role) for role in ("bos", "eos", "pad")}
    tied = not model.untie_embeddings_and_output_weights
    if arch == "llama":
        config = {
            "architectures": [HF_CLASS[arch]],
            "model_type": "llama",
            "vocab_size": model.vocab_size,
            "hidden_size": model.hidden_size,
            "intermediate_size": model.ffn,
            "num_hidden_layers": model.num_layers,
            "num_attention_heads": model.num_attention_heads,
            "num_key_value_heads": model.kv_groups,
            "head_dim": model.hidden_size // model.num_attention_heads,
            "hidden_act": "silu",
            "max_position_embeddings": model.max_positions,
            "rms_norm_eps": model.norm_epsilon,
            "rope_theta": float(model.rotary_base),
            "rope_scaling": None,
            "rope_parameters": {"rope_theta": float(model.rotary_base), "rope_type": "default"},
            # megatron's add_bias_linear puts a bias on all four attention and three MLP linears, as these two do.
            "attention_bias": model.add_bias_linear,
            "mlp_bias": model.add_bias_linear,
            "attention_dropout": model.attention_dropout,
            "initializer_range": model.init_method_std,
            "tie_word_embeddings": tied,
            "use_cache": True,
        }
    else:
        config = {
            "architectures": [HF_CLASS[arch]],
            "model_type": "gpt2",
            "vocab_size": model.vocab_size,
            "n_positions": model.max_positions,
            "n_embd": model.hidden_size,
            "n_layer": model.num_layers,
            "n_head": model.num_attention_heads,
            "n_inner": model.ffn,
            "activation_function": _EXPORT_ACTIVATION[model.activation],
            "layer_norm_epsilon": model.norm_epsilon,
            # megatron applies hidden_dropout to the embeddings and after attention and MLP.
            "resid_pdrop": model.hidden_dropout,
            "embd_pdrop": model.hidden_dropout,
            "attn_pdrop": model.attention_dropout,
            "initializer_range": model.init_method_std,
            "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False,
            "tie_word_embeddings": tied,
            "use_cache": True,
        }
    return {**config, **ids, "torch_dtype": dtype, "dtype": dtype}


def generation_config(token_ids: dict[str, int | None]) -> dict[str, Any]:
    """`generation_config.json`: which tokens start, end and pad a generation."""
    out: dict[str, Any] = {f"{role}_token_id": token_ids[role] for role in ("bos", "eos", "pad") if token_ids.get(role) is not None}
    return {**out, "do_sample": False}


# --- import ---------------------------------------------------------------------------------


def architecture_of_config(config: dict[str, Any], source: str) -> Arch:
    """Which of our architectures an HF `config.json` describes; UserError for any other."""
    model_type = config.get("model_type")
    archs = config.get("architectures") or []
    for arch, cls in HF_CLASS.items():
        if model_type == arch or cls in archs:
            return arch
    shown = model_type or (archs[0] if archs else None)
    raise UserError(f"{source}: model_type {shown!r} is not supported",
                    "llmforge imports llama (LlamaForCausalLM) and gpt2 (GPT2LMHeadModel) checkpoints")


def _require(config: dict[str, Any], keys: tuple[str, ...], source: str) -> None:
    missing = [k for k in keys if config.get(k) is None]
    if missing:
        raise UserError(f"{source}: missing {', '.join(missing)}", "a transformers-written config.json has these keys")


def _rope(config: dict[str, Any], source: str) -> int:
    """RoPE base from either the 4.x (`rope_theta`, `rope_scaling`) or 5.x (`rope_parameters`) keys."""
    params = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or {}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        field = "rope_parameters.rope_type" if params else "rope_scaling"
        raise UserError(f"{source}: {field} {kind!r} is not supported", "llmforge's RoPE is the unscaled (default) kind")
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    if float(theta) != int(theta):
        raise UserError(f"{source}: rope_theta {theta} is not a whole number", "model.rotary_base is an integer")
    return int(theta)


def _problems_llama(config: dict[str, Any], heads: int, hidden: int) -> list[str]:
    out = []
    if config.get("hidden_act", "silu") != "silu":
        out.append(f"hidden_act {config['hidden_act']!r} (needs 'silu': llmforge's swiglu)")
    if config.get("head_dim") not in (None, hidden // heads):
        out.append(f"head_dim {config['head_dim']} (needs hidden_size / num_attention_heads = {hidden // heads})")
    if bool(config.get("attention_bias", False)) != bool(config.get("mlp_bias", False)):
        out.append("attention_bias and mlp_bias differ (model.add_bias_linear sets both)")
    if config.get("sliding_window") is not None and config.get("use_sliding_window", True):
        out.append(f"sliding_window {config['sliding_window']} (llmforge attention is full causal)")
    return out


def from_hf_config(config: dict[str, Any], source: str) -> tuple[Arch, dict[str, Any]]:
    """The architecture and the `model:` options (`name: gpt`) equal to an HF config.

    `source` names the file in error messages.
    """
    arch = architecture_of_config(config, source)
    if arch == "llama":
        _require(config, ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"), source)
        heads, hidden = config["num_attention_heads"], config["hidden_size"]
        problems = _problems_llama(config, heads, hidden)
        if problems:
            raise UserError(f"{source}: LlamaForCausalLM with {'; '.join(problems)} cannot be represented",
                            "llmforge imports the standard Llama architecture")
        max_pos = config.get("max_position_embeddings", 2048)
        options = {
            "num_layers": config["num_hidden_layers"],
            "hidden_size": hidden,
            "num_attention_heads": heads,
            "num_query_groups": config.get("num_key_value_heads") or heads,
            "ffn_hidden_size": config["intermediate_size"],
            "vocab_size": config["vocab_size"],
            "seq_length": max_pos,
            "max_position_embeddings": max_pos,
            "position_embedding_type": "rope",
            "rotary_base": _rope(config, source),
            "normalization": "RMSNorm",
            "norm_epsilon": config.get("rms_norm_eps", 1e-6),
            "activation": "swiglu",
            "add_bias_linear": bool(config.get("attention_bias", False)),
            "untie_embeddings_and_output_weights": not config.get("tie_word_embeddings", False),
            "attention_dropout": float(config.get("attention_dropout", 0.0)),
            "hidden_dropout": 0.0,
            "init_method_std": config.get("initializer_range", 0.02),
        }
    else:
        _require(config, ("vocab_size", "n_embd", "n_layer", "n_head"), source)
        act = config.get("activation_function", "gelu_new")
        problems = []
        if act not in _GPT2_ACTIVATIONS:
            problems.append(f"activation_function {act!r} (supported: {', '.join(_GPT2_ACTIVATIONS)})")
        if config.get("scale_attn_by_inverse_layer_idx"):
            problems.append("scale_attn_by_inverse_layer_idx true (megatron scales every layer alike)")
        if config.get("scale_attn_weights", True) is False:
            problems.append("scale_attn_weights false (megatron scales scores by 1/sqrt(head_dim))")
        if problems:
            raise UserError(f"{source}: GPT2LMHeadModel with {'; '.join(problems)} cannot be represented",
                            "llmforge imports the standard GPT-2 architecture")
        max_pos = config.get("n_positions") or config.get("n_ctx") or 1024
        options = {
            "num_layers": config["n_layer"],
            "hidden_size": config["n_embd"],
            "num_attention_heads": config["n_head"],
            "num_query_groups": None,
            "ffn_hidden_size": config.get("n_inner") or 4 * config["n_embd"],
            "vocab_size": config["vocab_size"],
            "seq_length": max_pos,
            "max_position_embeddings": max_pos,
            "position_embedding_type": "learned_absolute",
            "normalization": "LayerNorm",
            "norm_epsilon": config.get("layer_norm_epsilon", 1e-5),
            "activation": _GPT2_ACTIVATIONS[act],
            "add_bias_linear": True,
            "untie_embeddings_and_output_weights": not config.get("tie_word_embeddings", True),
            "hidden_dropout": float(config.get("resid_pdrop", 0.1)),
            "attention_dropout": float(config.get("attn_pdrop", 0.1)),
            "init_method_std": config.get("initializer_range", 0.02),
        }
    return arch, {"name": "gpt", **options}


def validated_model(options: dict[str, Any], source: str) -> GPTModel:
    """`options` as a checked GPTModel; an HF config that breaks our rules is named, not traced."""
    from pydantic import ValidationError

    body = {k: v for k, v in options.items() if k != "name"}
    try:
        return GPTModel.model_validate(body)
    except ValidationError as e:
        detail = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'model'}: {err['msg']}" for err in e.errors())
        raise UserError(f"{source}: gives a model llmforge cannot build: {detail}") from None
