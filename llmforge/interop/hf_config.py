"""`config.json` ↔ the `gpt` model options, through the model families (`families/`).

Torch-free. Import reads the family from `model_type` (else `architectures`) and lets the
family map and check the config, naming every field it cannot represent. Export writes the
family an import recorded, else picks the one whose HF class computes exactly what the model
computes, and refuses with the fields that fit no family, because a config that loads but
computes something else is the worst outcome of all. The configs we write carry both the transformers 4.x and 5.x spellings of the
keys that were renamed (`rope_theta`/`rope_parameters`, `torch_dtype`/`dtype`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from llmforge.interop.families import family_of_config, family_of_model
from llmforge.spec.components import GPTModel
from llmforge.spec.errors import UserError

if TYPE_CHECKING:
    from llmforge.interop.families.base import Family

DTYPES = ("float32", "bfloat16", "float16")


def architecture_of(model: GPTModel) -> str:
    """The name of the family whose HF architecture computes exactly what `model` computes; UserError if none does."""
    return family_of_model(model).name


def to_hf_config(model: GPTModel, *, token_ids: dict[str, int | None], dtype: str, family: Family | None = None) -> dict[str, Any]:
    """The `config.json` of the HF model equal to `model`.

    Args:
        token_ids: {"bos", "eos", "pad"} → id or None, from the run's tokenizer.
        dtype: the dtype the weights are written in.
        family: the family to write (default: the one the model's shape picks).
    """
    family = family or family_of_model(model)
    ids = {f"{role}_token_id": token_ids.get(role) for role in ("bos", "eos", "pad")}
    head = {"architectures": [family.hf_class], "model_type": family.model_types[0]}
    return {**head, **family.to_config(model), **ids, "torch_dtype": dtype, "dtype": dtype}


def generation_config(token_ids: dict[str, int | None]) -> dict[str, Any]:
    """`generation_config.json`: which tokens start, end and pad a generation."""
    out: dict[str, Any] = {f"{role}_token_id": token_ids[role] for role in ("bos", "eos", "pad") if token_ids.get(role) is not None}
    return {**out, "do_sample": False}


def from_hf_config(config: dict[str, Any], source: str) -> tuple[str, dict[str, Any]]:
    """The family's name and the `model:` options (`name: gpt`) equal to an HF config.

    `source` names the file in error messages.
    """
    family = family_of_config(config, source)
    return family.name, {"name": "gpt", **family.from_config(config, source)}


def validated_model(options: dict[str, Any], source: str) -> GPTModel:
    """`options` as a checked GPTModel; an HF config that breaks our rules is named, not traced."""
    from pydantic import ValidationError

    body = {k: v for k, v in options.items() if k != "name"}
    try:
        return GPTModel.model_validate(body)
    except ValidationError as e:
        detail = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'model'}: {err['msg']}" for err in e.errors())
        raise UserError(f"{source}: gives a model llmforge cannot build: {detail}") from None
