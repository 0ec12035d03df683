"""Lean layers: megatron's dense GPT computed batch-first, at TP=1 and PP=1 on CPU.

megatron's block is written for tensor, sequence and pipeline parallelism: sequence-first
activations, a QKV output interleaved per query group, a Python autograd Function around
every linear, and about five module calls per matmul. At the shape of nanoGPT's recipe
(hidden 128) that structure, not the arithmetic, is the gap to a hand-written loop (issue 31,
docs/performance.md): the backward of the interleaved split and of SDPA on strided
sequence-first q/k/v, and ~2,300 Python calls a step against ~420.

`LeanTransformerBlock` is megatron's `TransformerBlock` with the same modules, parameters,
names and checkpoints. When nothing needs megatron's path (one process's worth of layout, fp32
parameters, no dropout while training, no hooks on its modules, no inference cache, recompute
or FP8; see `_lean_refusal`) its forward computes the same layers from the same weights in
batch-first order with plain torch functions (`F.linear`, SDPA, the norm modules); otherwise
it is megatron's forward, unchanged. `model_forward` does the same for the whole GPTModel
(embedding, block, output layer, per-token cross entropy), called from `layers.GPTModel.forward`
when `model_refusal` finds nothing against it. The two agree to float rounding, not bitwise
(tests/unit/models/test_lean.py checks losses, logits and every gradient against megatron's
own path, and the HF parity tests check the lean path against transformers); in one process,
alternating, the shakespeare-char step is 0.91–0.94 of megatron's (benchmarks/lean_layers_ab.py).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import _yarn_get_concentration_factor_from_config
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_layer import TransformerLayer

from llmforge.models.layers import FP32RMSNorm, SDPACoreAttention, _shared_bias

_NORMS = (torch.nn.LayerNorm, FP32RMSNorm)
# Block.forward arguments the lean path takes; any other one given (not None) means megatron's path.
_TAKEN = frozenset({"hidden_states", "attention_mask", "rotary_pos_emb"})
# Config switches whose path only megatron's forward implements.
_CONFIG_OFF = ("sequence_parallel", "fp8", "fp4", "recompute_granularity", "cpu_offloading", "fp32_residual_connection",
               "multi_latent_attention", "rotary_interleaved", "apply_rope_fusion", "attention_output_gate", "flash_decode",
               "bias_activation_fusion", "bias_dropout_fusion", "use_te_activation_func", "fine_grained_activation_offloading",
               "num_moe_experts", "activation_func_clamp_value", "test_mode")
_LAYER_OFF = ("recompute_input_layernorm", "recompute_pre_mlp_layernorm", "recompute_mlp", "offload_attn_norm", "offload_mlp_norm")


class LeanTransformerBlock(TransformerBlock):
    """megatron's TransformerBlock; at TP=1/PP=1 on CPU its forward runs batch-first (module docstring)."""

    # False: always megatron's forward (the parity tests compare the two). LLMFORGE_LEAN_LAYERS=0
    # turns it off for a process: the plan's activation model is megatron's layers', and the
    # plan-against-reality tests measure those.
    lean = os.environ.get("LLMFORGE_LEAN_LAYERS", "1") != "0"

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        if self.lean and _lean_refusal(self, hidden_states, kwargs) is None:
            return _lean_forward(self, hidden_states, attention_mask, kwargs.get("rotary_pos_emb"))
        return super().forward(hidden_states, attention_mask, **kwargs)


def _lean_refusal(block: TransformerBlock, hidden_states, kwargs: dict) -> str | None:
    """Why this call needs megatron's own forward (None: the lean path computes it the same)."""
    config = block.config
    if not isinstance(hidden_states, torch.Tensor) or hidden_states.device.type != "cpu":
        return "not a CPU tensor"
    if any(value is not None for key, value in kwargs.items() if key not in _TAKEN):
        return "an inference cache, packed sequences, context or attention bias"
    if isinstance(kwargs.get("rotary_pos_emb"), tuple):
        return "separate query and key rotary embeddings"
    if config.tensor_model_parallel_size != 1 or config.pipeline_model_parallel_size != 1 or config.context_parallel_size != 1:
        return "a parallel layout"
    if not block.pre_process or block.final_layernorm is None:
        return "a pipeline stage"
    if any(getattr(config, name, None) for name in _CONFIG_OFF) or getattr(config, "glu_linear_offset", 0.0):
        return "a config switch only megatron's forward implements"
    if config.bf16:
        # megatron's bf16 trains bitwise alike at every layout (tests/unit/runtime/test_step_parity.py)
        # only while every layout runs megatron's forward; bf16 rounding would tell the two apart.
        return "megatron's bf16 (layouts stay bitwise alike)"
    if block.training and (config.hidden_dropout or config.attention_dropout):
        return "dropout (its masks are drawn from megatron's RNG streams)"
    if torch.nn.modules.module._global_forward_hooks or torch.nn.modules.module._global_forward_pre_hooks:
        return "global module hooks"
    if _hooked(block) or _hooked(block.final_layernorm) or not isinstance(block.final_layernorm, _NORMS):
        return "hooks or another final norm"
    for layer in block.layers:
        if (reason := _layer_refusal(layer)) is not None:
            return reason
    return None


def _hooked(module: torch.nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _layer_refusal(layer) -> str | None:
    if type(layer) is not TransformerLayer or any(getattr(layer, name, False) for name in _LAYER_OFF):
        return "another layer type or recompute/offload"
    attention, mlp = layer.self_attention, layer.mlp
    if type(attention) is not SelfAttention or type(mlp) is not MLP or type(attention.core_attention) is not SDPACoreAttention:
        return "another attention or MLP (MoE, TransformerEngine)"
    if not (isinstance(layer.cross_attention, IdentityOp) and isinstance(layer.pre_cross_attn_layernorm, IdentityOp)):
        return "cross attention"
    if attention.core_attention.attn_mask_type != AttnMaskType.causal:
        return "a non-causal attention mask type"
    linears = (attention.linear_qkv, attention.linear_proj, mlp.linear_fc1, mlp.linear_fc2)
    if not all(type(m) in (ColumnParallelLinear, RowParallelLinear) and m.weight is not None for m in linears):
        return "another linear (an adapter's replacement)"
    qk_norms = [n for n in (attention.q_layernorm, attention.k_layernorm) if n is not None and not isinstance(n, IdentityOp)]
    norms = [layer.input_layernorm, layer.pre_mlp_layernorm, *qk_norms]
    if not all(isinstance(n, _NORMS) for n in norms):
        return "another norm"
    modules = (layer, attention, mlp, attention.core_attention, *linears, *norms)
    if any(_hooked(m) for m in modules):
        return "a module hook (LoRA adapters, activation capture)"
    return None


def _linear(module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A megatron parallel linear at TP=1: (output, the bias it leaves to its caller)."""
    if module.skip_bias_add:
        return F.linear(x, module.weight), module.bias
    return F.linear(x, module.weight, module.bias), None


def _add_residual(out: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor) -> torch.Tensor:
    # megatron's bias-dropout-add without dropout: the residual takes the output's dtype
    # (bf16 under autocast), then residual + (out + bias).
    if bias is not None:
        out = out + bias
    return (residual if residual.dtype == out.dtype else residual.to(out.dtype)) + out


def _rope(freqs: torch.Tensor | None, config):
    """megatron's [s, B, 1, d] rotary angles as (cos, sin) [B, 1, s, d], once for all layers (megatron: per layer)."""
    if freqs is None:
        return None
    freqs = freqs.permute(1, 2, 0, 3)
    mscale = _yarn_get_concentration_factor_from_config(config)
    return torch.cos(freqs) * mscale, torch.sin(freqs) * mscale


def _rotate(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """megatron's rotate-half RoPE on the first d dims of t [b, heads, s, head_dim], in t's dtype as megatron."""
    rot = cos.shape[-1]
    cos, sin = cos.to(t.dtype), sin.to(t.dtype)
    t, rest = t[..., :rot], t[..., rot:]
    x1, x2 = torch.chunk(t, 2, dim=-1)
    t = t * cos + torch.cat((-x2, x1), dim=-1) * sin
    return torch.cat((t, rest), dim=-1) if rest.shape[-1] else t


def _attention(layer, x: torch.Tensor, attention_mask, rope, kv=None) -> torch.Tensor:
    """The attention half of a layer on [b, s, h], residual included. `kv` (decoding): the layer's
    `_LayerKV`, which takes this step's keys and values and gives back every cached one, and whose
    decoder supplies the mask; else `attention_mask` (None: causal)."""
    attention = layer.self_attention
    b, s, _ = x.shape
    groups, dim = attention.num_query_groups_per_partition, attention.hidden_size_per_attention_head
    per_group = attention.num_attention_heads_per_partition // groups
    qkv, _ = _linear(attention.linear_qkv, layer.input_layernorm(x))
    # megatron's interleaved layout: per query group, its query heads, then one key and one value head.
    query, key, value = qkv.view(b, s, groups, (per_group + 2) * dim).split([per_group * dim, dim, dim], dim=3)
    query = query.reshape(b, s, groups * per_group, dim)
    if isinstance(attention.q_layernorm, _NORMS):  # qk_layernorm (else None or IdentityOp)
        query = attention.q_layernorm(query)
    if isinstance(attention.k_layernorm, _NORMS):
        key = attention.k_layernorm(key)
    query, key, value = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)  # [b, heads, s, dim]
    if rope is not None:
        query, key = _rotate(query, *rope), _rotate(key, *rope)
    core = attention.core_attention
    if kv is not None:
        key, value = kv(key, value)
        keep, causal = kv.owner.mask, kv.owner.causal
    else:
        keep = None if attention_mask is None else _shared_bias(attention_mask, query.dtype)
        causal = keep is None
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=keep, is_causal=causal, scale=core.softmax_scale,
                                         enable_gqa=groups != groups * per_group)
    out, bias = _linear(attention.linear_proj, out.transpose(1, 2).reshape(b, s, -1))
    return _add_residual(out, bias, x)


def _mlp(layer, x: torch.Tensor) -> torch.Tensor:
    mlp, config = layer.mlp, layer.config
    hidden, bias = _linear(mlp.linear_fc1, layer.pre_mlp_layernorm(x))
    if bias is not None:
        hidden = hidden + bias
    if config.gated_linear_unit:
        gate, up = torch.chunk(hidden, 2, dim=-1)
        hidden = config.activation_func(gate) * up
    else:
        hidden = mlp.activation_func(hidden)
    out, bias = _linear(mlp.linear_fc2, hidden)
    return _add_residual(out, bias, x)


def _layers(block: TransformerBlock, x: torch.Tensor, attention_mask, rotary_pos_emb) -> torch.Tensor:
    """The block's layers and final norm on batch-first [b, s, h]."""
    return _run_layers(block, x, attention_mask, _rope(rotary_pos_emb, block.config))


def _run_layers(block: TransformerBlock, x: torch.Tensor, attention_mask, rope, kvs=None) -> torch.Tensor:
    """The layers and final norm with RoPE as (cos, sin) or None; `kvs` (decoding) each layer's `_LayerKV`."""
    for layer, kv in zip(block.layers, kvs or [None] * len(block.layers)):
        x = _mlp(layer, _attention(layer, x, attention_mask, rope, kv))
    return block.final_layernorm(x)


def _lean_forward(block: TransformerBlock, hidden_states: torch.Tensor, attention_mask, rotary_pos_emb) -> torch.Tensor:
    """The block on megatron's [s, b, h] → [s, b, h], computed as [b, s, h]."""
    return _layers(block, hidden_states.transpose(0, 1).contiguous(), attention_mask, rotary_pos_emb).transpose(0, 1).contiguous()


# --- the whole model: embedding, block, output layer and loss, all batch-first ------------------

# GPTModel.forward arguments the lean model path takes; any other one given (not None) means megatron's path.
_MODEL_TAKEN = frozenset({"labels", "document_positions"})


# Bumped whenever any module anywhere gets a submodule or parameter assigned (torch's global
# registration hooks): a model's walk found nothing against the lean path, and while nothing
# was assigned since, only what `_still_lean` checks can have changed.
_structure_version = [0]


def _assigned(*_args) -> None:
    _structure_version[0] += 1  # returns None: the assignment goes through unchanged


torch.nn.modules.module.register_module_module_registration_hook(_assigned)
torch.nn.modules.module.register_module_parameter_registration_hook(_assigned)


def model_refusal(model, input_ids, kwargs: dict) -> str | None:
    """Why this GPTModel call needs megatron's own forward (None: `model_forward` computes it the same).

    Beyond the block's conditions: one stage holding embedding and output layer, a plain word
    (and learned or rotary position) embedding and output layer without hooks (a soft prompt
    hooks the embedding), no multi-token prediction, and no argument megatron's forward would act on.

    The whole walk (~400 Python calls, ~0.1 ms warm and several times that between training
    steps) runs until it finds nothing; after that, while no module or parameter of any model was
    assigned, a call checks only what can change without one (`_still_lean`), and any doubt
    walks again, so a refusal always names its reason.
    """
    accepted = model.__dict__.get("_lean_accepted")
    if accepted is not None and accepted[0] == _structure_version[0] and _still_lean(model, input_ids, kwargs, accepted[1]):
        return None
    reason = _model_refusal(model, input_ids, kwargs)
    if reason is None:
        model.__dict__["_lean_accepted"] = (_structure_version[0], _hook_dicts(model))
    return reason


def _hook_dicts(model) -> list:
    """The forward (pre-)hook dicts of every module the walk checks for hooks; registering or
    removing a hook changes these same dicts."""
    embedding, block = model.embedding, model.decoder
    modules = [embedding, embedding.word_embeddings, model.output_layer, block, block.final_layernorm]
    if embedding.add_position_embedding:
        modules.append(embedding.position_embeddings)
    for layer in block.layers:
        attention, mlp = layer.self_attention, layer.mlp
        modules += [layer, attention, mlp, attention.core_attention, attention.linear_qkv, attention.linear_proj, mlp.linear_fc1,
                    mlp.linear_fc2, layer.input_layernorm, layer.pre_mlp_layernorm, attention.q_layernorm, attention.k_layernorm]
    modules = [m for m in modules if m is not None]
    return [m._forward_hooks for m in modules] + [m._forward_pre_hooks for m in modules]


def _still_lean(model, input_ids, kwargs: dict, hook_dicts: list) -> bool:
    """The walk's conditions that change without a module being assigned: the switch, the call's
    arguments, the stage flags (a reward model turns `post_process` off to read hidden states),
    the config's switches, dropout in training mode, and hooks."""
    block = model.decoder
    config = block.config
    return (block.lean and isinstance(input_ids, torch.Tensor) and input_ids.device.type == "cpu"
            and model.pre_process and model.post_process and not getattr(model, "mtp_process", False) and block.pre_process
            and not model.embedding.reduce_scatter_embeddings
            and not any(value is not None for key, value in kwargs.items() if key not in _MODEL_TAKEN)
            and config.tensor_model_parallel_size == 1 and config.pipeline_model_parallel_size == 1 and config.context_parallel_size == 1
            and not any(getattr(config, name, None) for name in _CONFIG_OFF) and not getattr(config, "glu_linear_offset", 0.0)
            and not config.bf16 and not (block.training and (config.hidden_dropout or config.attention_dropout))
            and not torch.nn.modules.module._global_forward_hooks and not torch.nn.modules.module._global_forward_pre_hooks
            and not any(hook_dicts))


def _model_refusal(model, input_ids, kwargs: dict) -> str | None:
    if not getattr(model.decoder, "lean", False) or not isinstance(input_ids, torch.Tensor):
        return "lean layers off"
    if any(value is not None for key, value in kwargs.items() if key not in _MODEL_TAKEN):
        return "decoder input, an inference cache, packed sequences or loss mask"
    if not (model.pre_process and model.post_process) or getattr(model, "mtp_process", False):
        return "a pipeline stage or multi-token prediction"
    embedding = model.embedding
    if type(embedding) is not LanguageModelEmbedding or type(embedding.word_embeddings) is not VocabParallelEmbedding:
        return "another embedding"
    if embedding.tokentype_embeddings is not None or embedding.reduce_scatter_embeddings:
        return "token types or scattered embeddings"
    if model.position_embedding_type not in ("learned_absolute", "rope", "none"):
        return f"{model.position_embedding_type} position embeddings"
    if type(model.output_layer) is not ColumnParallelLinear or model.output_layer.bias is not None:
        return "another output layer"
    modules = [embedding, embedding.word_embeddings, model.output_layer] + ([embedding.position_embeddings] if embedding.add_position_embedding else [])
    if any(_hooked(m) for m in modules):
        return "a hook on the embedding or output layer (a soft prompt)"
    return _lean_refusal(model.decoder, input_ids, {})


def model_forward(model, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask, labels=None,
                  document_positions: bool = False) -> torch.Tensor:
    """megatron's GPTModel.forward computed batch-first: per-token losses [b, s] with labels, else logits [b, s, v]."""
    x = _embed(model, input_ids, position_ids)
    freqs = None
    if model.position_embedding_type == "rope":
        freqs = model.rotary_pos_emb(input_ids.shape[1])  # [s, 1, 1, d]
        if document_positions and position_ids is not None:
            freqs = freqs[:, 0][position_ids.t()]  # each token's own position (layers.GPTModel)
    x = _layers(model.decoder, x, attention_mask, freqs)
    logits = F.linear(x, _output_weight(model))
    if labels is None:
        return logits
    # megatron's vocab-parallel cross entropy at TP=1 is this (in fp32), to float rounding.
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="none").view_as(labels)


def _embed(model, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """Word (and learned position) embeddings of [b, s] ids, batch-first."""
    embedding = model.embedding
    x = F.embedding(input_ids, embedding.word_embeddings.weight)
    if embedding.add_position_embedding:
        x = x + embedding.position_embeddings(position_ids)
    return x


def _output_weight(model) -> torch.Tensor:
    return model.shared_embedding_or_output_weight() if model.share_embeddings_and_output_weights else model.output_layer.weight


# --- decoding: runtime.generate.StageDecoder's steps over a KV cache, batch-first ------------------


def decode_refusal(model) -> str | None:
    """Why StageDecoder must run this GPTModel chunk through megatron's modules (None: `DecodeCache` steps
    compute it the same): the whole model's conditions (`model_refusal`), in the mode the model is in now."""
    return model_refusal(model, torch.zeros(1, 1, dtype=torch.long), {})


class _LayerKV:
    """One layer's cached keys and values, [batch, groups, max_length, head_dim]."""

    def __init__(self, owner: "DecodeCache"):
        self.owner, self.key, self.value = owner, None, None

    def __call__(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        owner = self.owner
        if not owner.keep:
            return key, value
        if self.key is None:
            shape = (*key.shape[:2], owner.max_length, key.shape[-1])
            self.key, self.value = key.new_zeros(shape), value.new_zeros(shape)
        self.key[:, :, owner.start:owner.end] = key
        self.value[:, :, owner.start:owner.end] = value
        return self.key[:, :, :owner.end], self.value[:, :, :owner.end]


class DecodeCache:
    """A whole model's decoding steps computed batch-first with plain torch functions (the lean layers above),
    for StageDecoder when `decode_refusal` finds nothing against it: the same modules and weights, the same
    bottom-right causal mask and pads, to float rounding (tests/unit/models/test_lean.py).

    megatron's modules cost ~60% of a decode step at hidden 128 (docs/performance.md); the text preview at
    every evaluation decodes 48 tokens this way."""

    def __init__(self, model, *, max_length: int, keep: bool):
        self.model, self.max_length, self.keep = model, max_length, keep
        self.layers = [_LayerKV(self) for _ in model.decoder.layers]
        self.start = self.end = 0
        self.mask, self.causal = None, False
        self._cos = self._sin = None
        if model.position_embedding_type == "rope":
            cos, sin = _rope(model.rotary_pos_emb(max_length), model.config)  # [1, 1, max_length, d]
            self._cos, self._sin = cos[0, 0], sin[0, 0]

    def step(self, inputs: torch.Tensor, positions: torch.Tensor, start: int, mask, causal: bool) -> torch.Tensor:
        """Token ids [b, new] at `positions` [b, new] after `start` cached ones → final hidden states [b, new, h];
        `mask` [b, 1, new, start + new] (True: attend) or None with `causal` (SDPA's own mask)."""
        self.start, self.end = start, start + inputs.shape[1]
        self.mask, self.causal = mask, causal
        rope = None if self._cos is None else (self._cos[positions].unsqueeze(1), self._sin[positions].unsqueeze(1))  # [b, 1, new, d]
        return _run_layers(self.model.decoder, _embed(self.model, inputs, positions), None, rope, self.layers)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The output layer on hidden states [..., h]."""
        return F.linear(hidden, _output_weight(self.model))
