"""GPT-2 (`GPT2LMHeadModel`): learned positions, LayerNorm, GELU, biases everywhere.

HF keeps GPT-2's linears as `Conv1D`, whose weight is `[in, out]` (the transpose of a Linear's),
and fuses Q, K and V as `[Q; K; V]` in `c_attn` (megatron: rows grouped per head). Files from
the original release have no `transformer.` prefix and carry causal-mask buffers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from llmforge.interop.families.base import Family, Link, dims, matrix, mismatches, require, vector

if TYPE_CHECKING:
    from llmforge.spec.components import GPTModel

# HF activation names → ours. gelu_new, gelu_pytorch_tanh and gelu_fast are all the tanh
# approximation GPT-2 was trained with; only the spelling of the formula differs.
ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh", "gelu": "gelu"}
_EXPORT_ACTIVATION = {"gelu_tanh": "gelu_new", "gelu": "gelu"}
_NEEDS = {"position_embedding_type": "learned_absolute", "normalization": "LayerNorm", "activation": ("gelu_tanh", "gelu"),
          "add_bias_linear": True, "qk_layernorm": False}


class GPT2(Family):
    name = "gpt2"
    hf_class = "GPT2LMHeadModel"
    model_types = ("gpt2",)

    def from_config(self, config: dict[str, Any], source: str) -> dict[str, Any]:
        require(config, ("vocab_size", "n_embd", "n_layer", "n_head"), source)
        act = config.get("activation_function", "gelu_new")
        problems = []
        if act not in ACTIVATIONS:
            problems.append(f"activation_function {act!r} (supported: {', '.join(ACTIVATIONS)})")
        if config.get("scale_attn_by_inverse_layer_idx"):
            problems.append("scale_attn_by_inverse_layer_idx true (megatron scales every layer alike)")
        if config.get("scale_attn_weights", True) is False:
            problems.append("scale_attn_weights false (megatron scales scores by 1/sqrt(head_dim))")
        self.refuse(problems, source)
        max_pos = config.get("n_positions") or config.get("n_ctx") or 1024
        return {
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
            "activation": ACTIVATIONS[act],
            "add_bias_linear": True,
            "untie_embeddings_and_output_weights": not config.get("tie_word_embeddings", True),
            "hidden_dropout": float(config.get("resid_pdrop", 0.1)),
            "attention_dropout": float(config.get("attn_pdrop", 0.1)),
            "init_method_std": config.get("initializer_range", 0.02),
        }

    def misfits(self, model: GPTModel) -> list[str]:
        out = mismatches(model, _NEEDS)
        if model.kv_groups != model.num_attention_heads:
            out.append(f"num_query_groups {model.kv_groups} (GPT-2 has no grouped-query attention)")
        if model.head_dim * model.num_attention_heads != model.hidden_size:
            out.append(f"kv_channels {model.kv_channels} (GPT-2's heads are hidden_size / num_attention_heads wide)")
        return out

    def to_config(self, model: GPTModel) -> dict[str, Any]:
        return {
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
            "tie_word_embeddings": not model.untie_embeddings_and_output_weights,
            "use_cache": True,
        }

    def links(self, model: GPTModel) -> list[Link]:
        d, t = dims(model), "transformer."
        out = [
            matrix("embedding.word_embeddings.weight", t + "wte.weight", d.vocab, d.hidden),
            matrix("embedding.position_embeddings.weight", t + "wpe.weight", d.positions, d.hidden),
        ]
        for i in range(model.num_layers):
            m, h = f"decoder.layers.{i}.", f"{t}h.{i}."
            out += [
                vector(m + "input_layernorm.weight", h + "ln_1.weight", d.hidden),
                vector(m + "input_layernorm.bias", h + "ln_1.bias", d.hidden),
                Link(m + "self_attention.linear_qkv.weight", (h + "attn.c_attn.weight",), "c_attn", (d.qkv_rows, d.hidden),
                     ((d.hidden, d.qkv_rows),)),
                Link(m + "self_attention.linear_qkv.bias", (h + "attn.c_attn.bias",), "c_attn", (d.qkv_rows,), ((d.qkv_rows,),)),
                Link(m + "self_attention.linear_proj.weight", (h + "attn.c_proj.weight",), "transpose", (d.hidden, d.hidden),
                     ((d.hidden, d.hidden),)),
                vector(m + "self_attention.linear_proj.bias", h + "attn.c_proj.bias", d.hidden),
                vector(m + "pre_mlp_layernorm.weight", h + "ln_2.weight", d.hidden),
                vector(m + "pre_mlp_layernorm.bias", h + "ln_2.bias", d.hidden),
                Link(m + "mlp.linear_fc1.weight", (h + "mlp.c_fc.weight",), "transpose", (d.ffn, d.hidden), ((d.hidden, d.ffn),)),
                vector(m + "mlp.linear_fc1.bias", h + "mlp.c_fc.bias", d.ffn),
                Link(m + "mlp.linear_fc2.weight", (h + "mlp.c_proj.weight",), "transpose", (d.hidden, d.ffn), ((d.ffn, d.hidden),)),
                vector(m + "mlp.linear_fc2.bias", h + "mlp.c_proj.bias", d.hidden),
            ]
        out += [
            vector("decoder.final_layernorm.weight", t + "ln_f.weight", d.hidden),
            vector("decoder.final_layernorm.bias", t + "ln_f.bias", d.hidden),
        ]
        if model.untie_embeddings_and_output_weights:
            out.append(matrix("output_layer.weight", "lm_head.weight", d.vocab, d.hidden))
        return out

    def hf_renames(self, names: list[str]) -> dict[str, str]:
        if any(n.startswith("transformer.") for n in names):
            return {}
        return {n: "transformer." + n for n in names if n != "lm_head.weight"}


FAMILY = GPT2()
