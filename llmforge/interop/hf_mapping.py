"""Tensor names and layouts: megatron's GPTModel (TP=1, PP=1) ↔ HF Llama and GPT-2.

The layouts that differ, and so the places where conversions usually go wrong:

- megatron fuses Q, K and V into one `linear_qkv` whose rows are grouped per query group:
  `[q heads of group 0, k of group 0, v of group 0, q heads of group 1, ...]`. HF Llama
  keeps `q_proj`, `k_proj`, `v_proj` apart; HF GPT-2 fuses them as `[Q; K; V]` in `c_attn`.
- megatron's gated MLP fuses `linear_fc1` as `[gate; up]` (swiglu is `silu(x[0]) * x[1]`).
- HF GPT-2 uses `Conv1D`, whose weight is `[in, out]`: the transpose of a Linear's.
- RoPE needs nothing: megatron's default (`rotary_interleaved=False`) rotates halves, as
  HF's `rotate_half` does, and HF's Llama q/k rows are already in that order.

Every conversion is a list of `Link`s; both directions and all shape checks walk it, so a
tensor that is missing, unexpected or of the wrong shape is named in the error.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch

from llmforge.interop.hf_config import Arch, architecture_of
from llmforge.spec.components import GPTModel
from llmforge.spec.errors import UserError

Kind = Literal["copy", "transpose", "qkv", "c_attn", "glu"]

# Buffers some HF checkpoints carry that are not weights (causal masks, RoPE tables).
_HF_BUFFERS = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")
# TransformerEngine's layer spec fuses the norms into the next linear; same tensors, other names.
_TE_ALIASES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_bias": "input_layernorm.bias",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
    "mlp.linear_fc1.layer_norm_bias": "pre_mlp_layernorm.bias",
}


@dataclass(frozen=True)
class Link:
    """One megatron tensor and the HF tensor(s) it becomes."""

    megatron: str
    hf: tuple[str, ...]
    kind: Kind
    megatron_shape: tuple[int, ...]
    hf_shapes: tuple[tuple[int, ...], ...]


@dataclass(frozen=True)
class _Dims:
    hidden: int
    ffn: int
    heads: int
    groups: int
    head_dim: int
    vocab: int
    positions: int

    @property
    def qkv_rows(self) -> int:
        return (self.heads + 2 * self.groups) * self.head_dim


def dims(model: GPTModel) -> _Dims:
    return _Dims(hidden=model.hidden_size, ffn=model.ffn, heads=model.num_attention_heads, groups=model.kv_groups,
                 head_dim=model.hidden_size // model.num_attention_heads, vocab=model.vocab_size, positions=model.max_positions)


def _llama_links(model: GPTModel, d: _Dims) -> list[Link]:
    bias = model.add_bias_linear
    q_rows, kv_rows = d.heads * d.head_dim, d.groups * d.head_dim
    links = [Link("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "copy", (d.vocab, d.hidden), ((d.vocab, d.hidden),))]
    for i in range(model.num_layers):
        m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
        attn = (h + "self_attn.q_proj", h + "self_attn.k_proj", h + "self_attn.v_proj")
        mlp = (h + "mlp.gate_proj", h + "mlp.up_proj")
        links += [
            Link(m + "input_layernorm.weight", (h + "input_layernorm.weight",), "copy", (d.hidden,), ((d.hidden,),)),
            Link(m + "self_attention.linear_qkv.weight", tuple(n + ".weight" for n in attn), "qkv", (d.qkv_rows, d.hidden),
                 ((q_rows, d.hidden), (kv_rows, d.hidden), (kv_rows, d.hidden))),
            Link(m + "self_attention.linear_proj.weight", (h + "self_attn.o_proj.weight",), "copy", (d.hidden, q_rows),
                 ((d.hidden, q_rows),)),
            Link(m + "pre_mlp_layernorm.weight", (h + "post_attention_layernorm.weight",), "copy", (d.hidden,), ((d.hidden,),)),
            Link(m + "mlp.linear_fc1.weight", tuple(n + ".weight" for n in mlp), "glu", (2 * d.ffn, d.hidden),
                 ((d.ffn, d.hidden), (d.ffn, d.hidden))),
            Link(m + "mlp.linear_fc2.weight", (h + "mlp.down_proj.weight",), "copy", (d.hidden, d.ffn), ((d.hidden, d.ffn),)),
        ]
        if bias:
            links += [
                Link(m + "self_attention.linear_qkv.bias", tuple(n + ".bias" for n in attn), "qkv", (d.qkv_rows,),
                     ((q_rows,), (kv_rows,), (kv_rows,))),
                Link(m + "self_attention.linear_proj.bias", (h + "self_attn.o_proj.bias",), "copy", (d.hidden,), ((d.hidden,),)),
                Link(m + "mlp.linear_fc1.bias", tuple(n + ".bias" for n in mlp), "glu", (2 * d.ffn,), ((d.ffn,), (d.ffn,))),
                Link(m + "mlp.linear_fc2.bias", (h + "mlp.down_proj.bias",), "copy", (d.hidden,), ((d.hidden,),)),
            ]
    links.append(Link("decoder.final_layernorm.weight", ("model.norm.weight",), "copy", (d.hidden,), ((d.hidden,),)))
    if model.untie_embeddings_and_output_weights:
        links.append(Link("output_layer.weight", ("lm_head.weight",), "copy", (d.vocab, d.hidden), ((d.vocab, d.hidden),)))
    return links


def _gpt2_links(model: GPTModel, d: _Dims) -> list[Link]:
    t = "transformer."
    links = [
        Link("embedding.word_embeddings.weight", (t + "wte.weight",), "copy", (d.vocab, d.hidden), ((d.vocab, d.hidden),)),
        Link("embedding.position_embeddings.weight", (t + "wpe.weight",), "copy", (d.positions, d.hidden), ((d.positions, d.hidden),)),
    ]
    for i in range(model.num_layers):
        m, h = f"decoder.layers.{i}.", f"{t}h.{i}."
        links += [
            Link(m + "input_layernorm.weight", (h + "ln_1.weight",), "copy", (d.hidden,), ((d.hidden,),)),
            Link(m + "input_layernorm.bias", (h + "ln_1.bias",), "copy", (d.hidden,), ((d.hidden,),)),
            Link(m + "self_attention.linear_qkv.weight", (h + "attn.c_attn.weight",), "c_attn", (d.qkv_rows, d.hidden),
                 ((d.hidden, d.qkv_rows),)),
            Link(m + "self_attention.linear_qkv.bias", (h + "attn.c_attn.bias",), "c_attn", (d.qkv_rows,), ((d.qkv_rows,),)),
            Link(m + "self_attention.linear_proj.weight", (h + "attn.c_proj.weight",), "transpose", (d.hidden, d.hidden),
                 ((d.hidden, d.hidden),)),
            Link(m + "self_attention.linear_proj.bias", (h + "attn.c_proj.bias",), "copy", (d.hidden,), ((d.hidden,),)),
            Link(m + "pre_mlp_layernorm.weight", (h + "ln_2.weight",), "copy", (d.hidden,), ((d.hidden,),)),
            Link(m + "pre_mlp_layernorm.bias", (h + "ln_2.bias",), "copy", (d.hidden,), ((d.hidden,),)),
            Link(m + "mlp.linear_fc1.weight", (h + "mlp.c_fc.weight",), "transpose", (d.ffn, d.hidden), ((d.hidden, d.ffn),)),
            Link(m + "mlp.linear_fc1.bias", (h + "mlp.c_fc.bias",), "copy", (d.ffn,), ((d.ffn,),)),
            Link(m + "mlp.linear_fc2.weight", (h + "mlp.c_proj.weight",), "transpose", (d.hidden, d.ffn), ((d.ffn, d.hidden),)),
            Link(m + "mlp.linear_fc2.bias", (h + "mlp.c_proj.bias",), "copy", (d.hidden,), ((d.hidden,),)),
        ]
    links += [
        Link("decoder.final_layernorm.weight", (t + "ln_f.weight",), "copy", (d.hidden,), ((d.hidden,),)),
        Link("decoder.final_layernorm.bias", (t + "ln_f.bias",), "copy", (d.hidden,), ((d.hidden,),)),
    ]
    if model.untie_embeddings_and_output_weights:
        links.append(Link("output_layer.weight", ("lm_head.weight",), "copy", (d.vocab, d.hidden), ((d.vocab, d.hidden),)))
    return links


def links(model: GPTModel) -> list[Link]:
    """Every tensor of `model` and its HF counterpart(s)."""
    arch: Arch = architecture_of(model)
    d = dims(model)
    return _llama_links(model, d) if arch == "llama" else _gpt2_links(model, d)


# --- the fused layouts --------------------------------------------------------------------


def split_qkv(fused: torch.Tensor, d: _Dims) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """megatron's per-group `[q.., k, v]` rows → (Q, K, V) rows, heads in HF's order."""
    rest = fused.shape[1:]
    per_group = d.heads // d.groups
    grouped = fused.reshape(d.groups, per_group + 2, d.head_dim, *rest)
    q = grouped[:, :per_group].reshape(d.heads * d.head_dim, *rest)
    k = grouped[:, per_group].reshape(d.groups * d.head_dim, *rest)
    v = grouped[:, per_group + 1].reshape(d.groups * d.head_dim, *rest)
    return q, k, v


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, d: _Dims) -> torch.Tensor:
    """(Q, K, V) rows → megatron's per-group layout (HF's query head j uses key/value head j // heads-per-group)."""
    rest = q.shape[1:]
    per_group = d.heads // d.groups
    parts = (q.reshape(d.groups, per_group, d.head_dim, *rest), k.reshape(d.groups, 1, d.head_dim, *rest),
             v.reshape(d.groups, 1, d.head_dim, *rest))
    return torch.cat(parts, dim=1).reshape(d.qkv_rows, *rest)


def link_to_hf(link: Link, t: torch.Tensor, d: _Dims) -> tuple[torch.Tensor, ...]:
    if link.kind == "copy":
        return (t,)
    if link.kind == "transpose":
        return (t.t(),)
    if link.kind == "qkv":
        return split_qkv(t, d)
    if link.kind == "glu":
        return tuple(t.chunk(2, dim=0))
    fused = torch.cat(split_qkv(t, d), dim=0)  # c_attn
    return (fused.t() if fused.dim() == 2 else fused,)


def _from_hf(link: Link, ts: tuple[torch.Tensor, ...], d: _Dims) -> torch.Tensor:
    if link.kind == "copy":
        return ts[0]
    if link.kind == "transpose":
        return ts[0].t()
    if link.kind == "qkv":
        return fuse_qkv(*ts, d)
    if link.kind == "glu":
        return torch.cat(ts, dim=0)
    fused = ts[0].t() if ts[0].dim() == 2 else ts[0]  # c_attn: [Q; K; V] rows
    return fuse_qkv(*fused.split(d.hidden, dim=0), d)


# --- checks and the two directions ----------------------------------------------------------


def _check(tensors: Mapping[str, torch.Tensor], expected: dict[str, tuple[int, ...]], source: str, implied_by: str,
           hint: str) -> None:
    """Name every missing, unexpected or misshapen tensor (the first few of each)."""
    problems = []
    missing = [n for n in expected if n not in tensors]
    unexpected = [n for n in tensors if n not in expected]
    shapes = [f"{n} has shape {tuple(tensors[n].shape)}, {implied_by} implies {expected[n]}"
              for n in expected if n in tensors and tuple(tensors[n].shape) != expected[n]]
    for label, names in (("missing tensor", missing), ("unexpected tensor", unexpected), ("wrong shape", shapes)):
        if names:
            more = f" (and {len(names) - 3} more)" if len(names) > 3 else ""
            problems.append(f"{label}{'s' if len(names) > 1 and label != 'wrong shape' else ''}: {', '.join(names[:3])}{more}")
    if problems:
        raise UserError(f"{source}: " + "; ".join(problems), hint)


def canonical_name(name: str) -> str:
    """A megatron parameter name as the local layer spec spells it (TE fuses the norms into the linears)."""
    for te, local in _TE_ALIASES.items():
        if name.endswith(te):
            return name[: -len(te)] + local
    return name


def canonical_megatron(state: Mapping[str, torch.Tensor | object]) -> dict[str, torch.Tensor]:
    """A megatron state dict with `_extra_state` dropped and canonical names."""
    return {canonical_name(name): value for name, value in state.items()
            if isinstance(value, torch.Tensor) and not name.endswith("._extra_state")}


def to_hf(state: Mapping[str, torch.Tensor], model: GPTModel, *, source: str) -> dict[str, torch.Tensor]:
    """HF tensors (names as `save_pretrained` writes them) from a TP=1/PP=1 megatron state dict."""
    d, table = dims(model), links(model)
    state = canonical_megatron(state)
    if not model.untie_embeddings_and_output_weights:
        state.pop("output_layer.weight", None)  # a tied output layer is the embedding itself
    _check(state, {link.megatron: link.megatron_shape for link in table}, source, "the run's model spec",
           "the checkpoint does not belong to this model spec; export the run dir it came from")
    out: dict[str, torch.Tensor] = {}
    for link in table:
        for name, tensor in zip(link.hf, link_to_hf(link, state[link.megatron], d), strict=True):
            out[name] = tensor
    return out


def normalize_hf_names(tensors: Mapping[str, torch.Tensor], arch: Arch, *, tied: bool) -> dict[str, torch.Tensor]:
    """Drop buffers, add the `transformer.` prefix old GPT-2 files lack, drop a tied `lm_head`."""
    out = {n: t for n, t in tensors.items() if not n.endswith(_HF_BUFFERS)}
    if arch == "gpt2" and not any(n.startswith("transformer.") for n in out):
        out = {(n if n == "lm_head.weight" else "transformer." + n): t for n, t in out.items()}
    if tied:
        out.pop("lm_head.weight", None)  # transformers ties it to the embedding on load, whatever the file says
    return out


def from_hf(tensors: Mapping[str, torch.Tensor], model: GPTModel, *, source: str) -> dict[str, torch.Tensor]:
    """A TP=1/PP=1 megatron state dict (canonical names) from HF tensors."""
    arch = architecture_of(model)
    d, table = dims(model), links(model)
    tensors = normalize_hf_names(tensors, arch, tied=not model.untie_embeddings_and_output_weights)
    expected = {name: shape for link in table for name, shape in zip(link.hf, link.hf_shapes, strict=True)}
    _check(tensors, expected, source, "config.json", "the weights do not match config.json; check that both come from the same model")
    return {link.megatron: _from_hf(link, tuple(tensors[n] for n in link.hf), d) for link in table}
