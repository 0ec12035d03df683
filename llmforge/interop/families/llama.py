"""Llama 2, 3, 3.1, 3.2 (`LlamaForCausalLM`), and the Llama layout that Mistral, Qwen2 and Qwen3 share.

The layout: RoPE (megatron's non-interleaved halves are HF's `rotate_half`, and HF's q/k rows
are already in that order), RMSNorm, SwiGLU (`gate_proj`/`up_proj` → megatron's fused
`[gate; up]` `linear_fc1`), q/k/v kept apart (→ megatron's fused `linear_qkv`, rows grouped per
query group), `head_dim` free (megatron's `kv_channels`). Llama 3.x scales RoPE by `rope_type:
llama3`; megatron-core 0.16 fixes its low/high frequency factors and original context at
Llama 3.1 and 3.2's values, so other values are refused by name.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from llmforge.interop.families.base import Family, Link, dims, matrix, mismatches, require, vector

if TYPE_CHECKING:
    from llmforge.spec.components import GPTModel

# megatron-core 0.16's RotaryEmbedding._apply_scaling hard-codes these three llama3 settings.
LLAMA3_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
# What every Llama-layout family needs from the model options (export), before its own switches.
LAYOUT = {"position_embedding_type": "rope", "normalization": "RMSNorm", "activation": "swiglu"}


def rope_options(config: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """`rotary_base` and `rope_scaling_factor` from the 4.x (`rope_theta`, `rope_scaling`) or 5.x
    (`rope_parameters`) keys, and the problems, each naming the field the config used."""
    params, scaling = config.get("rope_parameters"), config.get("rope_scaling")
    field, table = ("rope_parameters", params) if isinstance(params, dict) and params else ("rope_scaling", scaling or {})
    kind_key = "rope_type" if "rope_type" in table else "type"
    kind = table.get(kind_key) or "default"
    theta = float(table.get("rope_theta", config.get("rope_theta", 10000.0)))
    problems = []
    partial = table.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        problems.append(f"partial_rotary_factor {partial} (llmforge's RoPE turns every channel of a head)")
    factor = None
    if kind == "llama3":
        factor = table.get("factor")
        if factor is None:
            problems.append(f"{field}.factor missing (rope_type llama3 needs it)")
        for key, value in LLAMA3_FIXED.items():
            got = table.get(key)
            if got is None or float(got) != value:
                problems.append(f"{field}.{key} {got} (megatron-core 0.16 fixes it at {value:g}, as Llama 3.1 and 3.2 have it)")
    elif kind != "default":
        problems.append(f"{field}.{kind_key} {kind!r} (supported: default, llama3)")
    return {"rotary_base": theta, "rope_scaling_factor": None if factor is None else float(factor)}, problems


def rope_config(model: GPTModel) -> dict[str, Any]:
    """The RoPE keys of `config.json`, in both the transformers 4.x and 5.x spellings."""
    theta = float(model.rotary_base)
    scaling = None
    if model.rope_scaling_factor is not None:
        scaling = {"rope_type": "llama3", "factor": float(model.rope_scaling_factor), **LLAMA3_FIXED}
    return {"rope_theta": theta, "rope_scaling": scaling, "rope_parameters": {**(scaling or {"rope_type": "default"}), "rope_theta": theta}}


class Llama(Family):
    """`LlamaForCausalLM`; the subclasses change the checks and switches, never the layout."""

    name = "llama"
    hf_class = "LlamaForCausalLM"
    model_types = ("llama",)
    default_head_dim: int | None = None  # None: hidden_size / num_attention_heads

    # --- import ---------------------------------------------------------------------------

    def problems(self, config: dict[str, Any]) -> list[str]:
        """What llmforge cannot compute of `config`, each starting with the config.json field."""
        out = []
        if config.get("hidden_act", "silu") != "silu":
            out.append(f"hidden_act {config['hidden_act']!r} (needs 'silu': llmforge's swiglu)")
        return out + self.own_problems(config)

    def own_problems(self, config: dict[str, Any]) -> list[str]:
        """The family's own refusals (biases, attention windows)."""
        if bool(config.get("attention_bias", False)) != bool(config.get("mlp_bias", False)):
            return ["attention_bias and mlp_bias differ (model.add_bias_linear sets both)"]
        return []

    def switches(self, config: dict[str, Any]) -> dict[str, Any]:
        """The family's own model options (biases, q/k norms)."""
        return {"add_bias_linear": bool(config.get("attention_bias", False))}

    def from_config(self, config: dict[str, Any], source: str) -> dict[str, Any]:
        require(config, ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"), source)
        rope, rope_problems = rope_options(config)
        self.refuse(self.problems(config) + rope_problems, source)
        heads, hidden = config["num_attention_heads"], config["hidden_size"]
        head_dim = config.get("head_dim") or self.default_head_dim or hidden // heads
        max_pos = config.get("max_position_embeddings", 2048)
        return {
            "num_layers": config["num_hidden_layers"],
            "hidden_size": hidden,
            "num_attention_heads": heads,
            "num_query_groups": config.get("num_key_value_heads") or heads,
            "kv_channels": None if head_dim * heads == hidden else head_dim,
            "ffn_hidden_size": config["intermediate_size"],
            "vocab_size": config["vocab_size"],
            "seq_length": max_pos,
            "max_position_embeddings": max_pos,
            "position_embedding_type": "rope",
            **rope,
            "normalization": "RMSNorm",
            "norm_epsilon": config.get("rms_norm_eps", 1e-6),
            "activation": "swiglu",
            **self.switches(config),
            "untie_embeddings_and_output_weights": not config.get("tie_word_embeddings", False),
            "attention_dropout": float(config.get("attention_dropout", 0.0)),
            "hidden_dropout": 0.0,
            "init_method_std": config.get("initializer_range", 0.02),
        }

    # --- export ---------------------------------------------------------------------------

    def needs(self) -> dict[str, Any]:
        """Model option → the value (or values) this family can represent."""
        return {**LAYOUT, "add_qkv_bias": False, "qk_layernorm": False, "num_moe_experts": None}

    def misfits(self, model: GPTModel) -> list[str]:
        return mismatches(model, self.needs())

    def own_config(self, model: GPTModel) -> dict[str, Any]:
        # megatron's add_bias_linear puts a bias on all four attention and three MLP linears, as these two do.
        return {"attention_bias": model.add_bias_linear, "mlp_bias": model.add_bias_linear}

    def to_config(self, model: GPTModel) -> dict[str, Any]:
        return {
            "vocab_size": model.vocab_size,
            "hidden_size": model.hidden_size,
            "intermediate_size": model.ffn,
            "num_hidden_layers": model.num_layers,
            "num_attention_heads": model.num_attention_heads,
            "num_key_value_heads": model.kv_groups,
            "head_dim": model.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": model.max_positions,
            "rms_norm_eps": model.norm_epsilon,
            **rope_config(model),
            **self.own_config(model),
            "attention_dropout": model.attention_dropout,
            "initializer_range": model.init_method_std,
            "tie_word_embeddings": not model.untie_embeddings_and_output_weights,
            "use_cache": True,
        }

    # --- tensors --------------------------------------------------------------------------

    def links(self, model: GPTModel) -> list[Link]:
        d = dims(model)
        q_rows, kv_rows = d.heads * d.head_dim, d.groups * d.head_dim
        linear_bias, qkv_bias = model.add_bias_linear, model.add_bias_linear or model.add_qkv_bias
        out = [matrix("embedding.word_embeddings.weight", "model.embed_tokens.weight", d.vocab, d.hidden)]
        for i in range(model.num_layers):
            m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
            attn = (h + "self_attn.q_proj", h + "self_attn.k_proj", h + "self_attn.v_proj")
            mlp = (h + "mlp.gate_proj", h + "mlp.up_proj")
            out += [
                vector(m + "input_layernorm.weight", h + "input_layernorm.weight", d.hidden),
                Link(m + "self_attention.linear_qkv.weight", tuple(n + ".weight" for n in attn), "qkv", (d.qkv_rows, d.hidden),
                     ((q_rows, d.hidden), (kv_rows, d.hidden), (kv_rows, d.hidden))),
                matrix(m + "self_attention.linear_proj.weight", h + "self_attn.o_proj.weight", d.hidden, q_rows),
                vector(m + "pre_mlp_layernorm.weight", h + "post_attention_layernorm.weight", d.hidden),
                *self.mlp_links(model, i),
            ]
            if qkv_bias:
                out.append(Link(m + "self_attention.linear_qkv.bias", tuple(n + ".bias" for n in attn), "qkv", (d.qkv_rows,),
                                ((q_rows,), (kv_rows,), (kv_rows,))))
            if model.qk_layernorm:  # one weight per head width, shared by every head (Qwen3's q_norm / k_norm)
                out += [vector(m + "self_attention.q_layernorm.weight", h + "self_attn.q_norm.weight", d.head_dim),
                        vector(m + "self_attention.k_layernorm.weight", h + "self_attn.k_norm.weight", d.head_dim)]
            if linear_bias:
                out += [
                    vector(m + "self_attention.linear_proj.bias", h + "self_attn.o_proj.bias", d.hidden),
                    Link(m + "mlp.linear_fc1.bias", tuple(n + ".bias" for n in mlp), "glu", (2 * d.ffn,), ((d.ffn,), (d.ffn,))),
                    vector(m + "mlp.linear_fc2.bias", h + "mlp.down_proj.bias", d.hidden),
                ]
        out.append(vector("decoder.final_layernorm.weight", "model.norm.weight", d.hidden))
        if model.untie_embeddings_and_output_weights:
            out.append(matrix("output_layer.weight", "lm_head.weight", d.vocab, d.hidden))
        return out

    def mlp_links(self, model: GPTModel, layer: int) -> list[Link]:
        """The weights of layer `layer`'s MLP (the MoE families route some layers' MLPs to experts)."""
        return gated_mlp(f"decoder.layers.{layer}.mlp.", f"model.layers.{layer}.mlp.", ("gate_proj", "up_proj", "down_proj"),
                         model.hidden_size, model.ffn)


def gated_mlp(megatron: str, hf: str, names: tuple[str, str, str], hidden: int, width: int) -> list[Link]:
    """A SwiGLU MLP's two weights: megatron's fused `[gate; up]` `linear_fc1` and `linear_fc2`, as HF's (gate, up, down) `names`."""
    gate, up, down = (hf + n + ".weight" for n in names)
    return [Link(megatron + "linear_fc1.weight", (gate, up), "glu", (2 * width, hidden), ((width, hidden), (width, hidden))),
            matrix(megatron + "linear_fc2.weight", down, hidden, width)]


FAMILY = Llama()
