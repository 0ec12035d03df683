"""What every HF model family module provides, and the helpers they share. Torch-free.

A family is one HF architecture (`LlamaForCausalLM`, `Qwen3ForCausalLM`, ...): what identifies
its `config.json`, the `config.json` ↔ `gpt` model options mapping both ways, and its tensor
table (`Link`s: one megatron tensor and the HF tensor(s) it becomes). The tensor arithmetic that
walks the table lives in `hf_mapping`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from llmforge.spec.errors import UserError

if TYPE_CHECKING:
    from llmforge.spec.components import GPTModel

Kind = Literal["copy", "transpose", "qkv", "c_attn", "glu"]


@dataclass(frozen=True)
class Link:
    """One megatron tensor and the HF tensor(s) it becomes.

    kind: how the HF tensors are made from the megatron one — `copy`, `transpose` (Conv1D),
    `qkv` (megatron's per-group fused rows → q, k, v), `c_attn` (→ GPT-2's `[Q; K; V]`,
    transposed), `glu` (`[gate; up]` → gate, up).
    """

    megatron: str
    hf: tuple[str, ...]
    kind: Kind
    megatron_shape: tuple[int, ...]
    hf_shapes: tuple[tuple[int, ...], ...]


@dataclass(frozen=True)
class Dims:
    """The sizes every tensor shape is made of."""

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


def dims(model: GPTModel) -> Dims:
    return Dims(hidden=model.hidden_size, ffn=model.ffn, heads=model.num_attention_heads, groups=model.kv_groups,
                head_dim=model.head_dim, vocab=model.vocab_size, positions=model.max_positions)


def vector(megatron: str, hf: str, size: int) -> Link:
    """A 1-D tensor copied as it is (norm weights, biases)."""
    return Link(megatron, (hf,), "copy", (size,), ((size,),))


def matrix(megatron: str, hf: str, rows: int, cols: int) -> Link:
    return Link(megatron, (hf,), "copy", (rows, cols), ((rows, cols),))


class Family(ABC):
    """One HF architecture. Subclasses set the class variables and implement the four methods.

    Attributes:
        name: the family's name in messages, docs and the import record (`llama`, `qwen2`, ...).
        hf_class: the transformers class export writes (`config.json` `architectures`).
        model_types: the `config.json` `model_type` values that identify it.
        by_shape: export may pick this family from the model's shape alone (Mistral computes
            exactly what Llama does, so only an import record makes an export Mistral).
    """

    name: ClassVar[str]
    hf_class: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]
    by_shape: ClassVar[bool] = True

    def identifies(self, config: dict[str, Any]) -> bool:
        """Whether `config.json` names this family (by `model_type`, else by `architectures`)."""
        model_type = config.get("model_type")
        if model_type:
            return model_type in self.model_types
        return self.hf_class in (config.get("architectures") or [])

    @abstractmethod
    def from_config(self, config: dict[str, Any], source: str) -> dict[str, Any]:
        """The `gpt` model options (without `name`) equal to `config`; UserError naming each field that does not fit."""

    @abstractmethod
    def misfits(self, model: GPTModel) -> list[str]:
        """The model options this family cannot represent, as 'field X (needs Y)' strings."""

    @abstractmethod
    def to_config(self, model: GPTModel) -> dict[str, Any]:
        """The family's own `config.json` keys for `model` (token ids and dtype are added by the caller)."""

    @abstractmethod
    def links(self, model: GPTModel) -> list[Link]:
        """Every tensor of `model` and its HF counterpart(s)."""

    def hf_renames(self, names: list[str]) -> dict[str, str]:
        """Renames that bring a checkpoint's tensor names to the ones `save_pretrained` writes now (old files)."""
        del names
        return {}

    # --- helpers for the subclasses --------------------------------------------------------

    def refuse(self, problems: list[str], source: str) -> None:
        if problems:
            raise UserError(f"{source}: {self.hf_class} with {'; '.join(problems)} cannot be represented",
                            f"llmforge imports the standard {self.hf_class} (docs/interop.md lists what each family needs)")


def require(config: dict[str, Any], keys: tuple[str, ...], source: str) -> None:
    missing = [k for k in keys if config.get(k) is None]
    if missing:
        raise UserError(f"{source}: missing {', '.join(missing)}", "a transformers-written config.json has these keys")


def mismatches(model: GPTModel, needs: dict[str, Any]) -> list[str]:
    """'field X (needs Y)' for each option of `model` that differs from `needs` (a tuple: any of its values)."""
    out = []
    for name, need in needs.items():
        have = getattr(model, name)
        ok = have in need if isinstance(need, tuple) else have == need
        if not ok:
            shown = " or ".join(map(str, need)) if isinstance(need, tuple) else need
            out.append(f"{name} {have} (needs {shown})")
    return out
