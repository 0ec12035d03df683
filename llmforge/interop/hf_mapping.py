"""Tensor names and layouts: megatron's GPTModel (TP=1, PP=1) ↔ HF, walking a family's `Link` table.

The layouts that differ, and so the places where conversions usually go wrong:

- megatron fuses Q, K and V into one `linear_qkv` whose rows are grouped per query group:
  `[q heads of group 0, k of group 0, v of group 0, q heads of group 1, ...]`. HF's Llama
  layout keeps `q_proj`, `k_proj`, `v_proj` apart; HF GPT-2 fuses them as `[Q; K; V]` in `c_attn`.
- megatron's gated MLP fuses `linear_fc1` as `[gate; up]` (swiglu is `silu(x[0]) * x[1]`).
- HF GPT-2 uses `Conv1D`, whose weight is `[in, out]`: the transpose of a Linear's.
- RoPE needs nothing: megatron's default (`rotary_interleaved=False`) rotates halves, as
  HF's `rotate_half` does, and HF's q/k rows are already in that order.

Each family (`families/`) declares its tensors as `Link`s; both directions and all shape checks
walk that table, so a tensor that is missing, unexpected or of the wrong shape is named in the error.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from llmforge.interop.families import family_of_model
from llmforge.interop.families.base import Dims, Family, Link, dims
from llmforge.spec.components import GPTModel
from llmforge.spec.errors import UserError

# Buffers some HF checkpoints carry that are not weights (causal masks, RoPE tables).
_HF_BUFFERS = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")
# TransformerEngine's layer spec fuses the norms into the next linear; same tensors, other names.
_TE_ALIASES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_bias": "input_layernorm.bias",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
    "mlp.linear_fc1.layer_norm_bias": "pre_mlp_layernorm.bias",
}


def links(model: GPTModel, family: Family | None = None) -> list[Link]:
    """Every tensor of `model` and its HF counterpart(s), in the table of `family` (default: the one its shape picks)."""
    return (family or family_of_model(model)).links(model)


# --- the fused layouts --------------------------------------------------------------------


def split_qkv(fused: torch.Tensor, d: Dims) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """megatron's per-group `[q.., k, v]` rows → (Q, K, V) rows, heads in HF's order."""
    rest = fused.shape[1:]
    per_group = d.heads // d.groups
    grouped = fused.reshape(d.groups, per_group + 2, d.head_dim, *rest)
    q = grouped[:, :per_group].reshape(d.heads * d.head_dim, *rest)
    k = grouped[:, per_group].reshape(d.groups * d.head_dim, *rest)
    v = grouped[:, per_group + 1].reshape(d.groups * d.head_dim, *rest)
    return q, k, v


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, d: Dims) -> torch.Tensor:
    """(Q, K, V) rows → megatron's per-group layout (HF's query head j uses key/value head j // heads-per-group)."""
    rest = q.shape[1:]
    per_group = d.heads // d.groups
    parts = (q.reshape(d.groups, per_group, d.head_dim, *rest), k.reshape(d.groups, 1, d.head_dim, *rest),
             v.reshape(d.groups, 1, d.head_dim, *rest))
    return torch.cat(parts, dim=1).reshape(d.qkv_rows, *rest)


def link_to_hf(link: Link, t: torch.Tensor, d: Dims) -> tuple[torch.Tensor, ...]:
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


def link_from_hf(link: Link, ts: tuple[torch.Tensor, ...], d: Dims) -> torch.Tensor:
    """The megatron tensor of `link` from its HF tensors (`link_to_hf` undone)."""
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


def _check(shapes: Mapping[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]], source: str, implied_by: str,
           hint: str) -> None:
    """Name every missing, unexpected or misshapen tensor (the first few of each)."""
    problems = []
    missing = [n for n in expected if n not in shapes]
    unexpected = [n for n in shapes if n not in expected]
    wrong = [f"{n} has shape {tuple(shapes[n])}, {implied_by} implies {expected[n]}"
             for n in expected if n in shapes and tuple(shapes[n]) != expected[n]]
    for label, names in (("missing tensor", missing), ("unexpected tensor", unexpected), ("wrong shape", wrong)):
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


def to_hf(state: Mapping[str, torch.Tensor], model: GPTModel, *, source: str, family: Family | None = None) -> dict[str, torch.Tensor]:
    """HF tensors (names as `save_pretrained` writes them) from a TP=1/PP=1 megatron state dict."""
    d, table = dims(model), links(model, family)
    state = canonical_megatron(state)
    if not model.untie_embeddings_and_output_weights:
        state.pop("output_layer.weight", None)  # a tied output layer is the embedding itself
    _check({n: tuple(t.shape) for n, t in state.items()}, {link.megatron: link.megatron_shape for link in table}, source,
           "the run's model spec", "the checkpoint does not belong to this model spec; export the run dir it came from")
    out: dict[str, torch.Tensor] = {}
    for link in table:
        for name, tensor in zip(link.hf, link_to_hf(link, state[link.megatron], d), strict=True):
            out[name] = tensor
    return out


def hf_stored_names(names: list[str], model: GPTModel, family: Family) -> dict[str, str]:
    """The name `save_pretrained` writes now → the name a file of the family stores it under.

    Buffers are dropped, old files' names renamed, and a tied `lm_head` dropped (transformers
    ties it to the embedding on load, whatever the file says).
    """
    kept = [n for n in names if not n.endswith(_HF_BUFFERS)]
    renames = family.hf_renames(kept)
    out = {renames.get(n, n): n for n in kept}
    if not model.untie_embeddings_and_output_weights:
        out.pop("lm_head.weight", None)
    return out


def check_hf_shapes(shapes: Mapping[str, tuple[int, ...]], model: GPTModel, family: Family, *, source: str) -> None:
    """UserError naming every tensor of an HF checkpoint (names as `hf_stored_names` keys them) that the config does not imply."""
    expected = {name: shape for link in links(model, family) for name, shape in zip(link.hf, link.hf_shapes, strict=True)}
    _check(shapes, expected, source, "config.json", "the weights do not match config.json; check that both come from the same model")


def from_hf(tensors: Mapping[str, torch.Tensor], model: GPTModel, *, source: str, family: Family | None = None) -> dict[str, torch.Tensor]:
    """A TP=1/PP=1 megatron state dict (canonical names) from HF tensors of `family` (default: the one the shape picks)."""
    family = family or family_of_model(model)
    d, stored = dims(model), hf_stored_names(list(tensors), model, family)
    check_hf_shapes({n: tuple(tensors[s].shape) for n, s in stored.items()}, model, family, source=source)
    return {link.megatron: link_from_hf(link, tuple(tensors[stored[n]] for n in link.hf), d) for link in links(model, family)}
