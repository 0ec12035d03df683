"""The files of an HF model directory: safetensors (sharded with an index), tokenizer files,
and the atomic publication of a whole output directory.

An output directory is built in a hidden sibling (`.NAME.tmp-PID`), fsynced, and renamed
into place only when every file is written, so a reader never sees half an export or
half an import, and a failed one leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from llmforge.atomic import fsync_dir, fsync_tree
from llmforge.spec.errors import UserError

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_BIN = "pytorch_model.bin"
TORCH_BIN_INDEX = "pytorch_model.bin.index.json"
# HF tokenizer files copied as they are; tokenizer.json is the one llmforge reads.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30  # transformers' own default for save_pretrained


# --- output directories -------------------------------------------------------------------


def _nonempty(path: Path) -> bool:
    return path.exists() and (not path.is_dir() or any(path.iterdir()))


@contextlib.contextmanager
def staged_output(out_dir: Path, *, overwrite: bool) -> Iterator[Path]:
    """Yield a temp dir next to `out_dir`; on success publish it as `out_dir`, on failure remove it.

    An existing non-empty `out_dir` is refused unless `overwrite`; then it is replaced
    only after the new one is complete.
    """
    out_dir = Path(out_dir)
    if _nonempty(out_dir) and not overwrite:
        raise UserError(f"{out_dir} exists and is not empty", "pick a new output directory, or pass --overwrite to replace it")
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir} is a file, not a directory", "pick a directory path for the output")
    parent = out_dir.absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
        old = parent / f".{out_dir.name}.old-{os.getpid()}"
        if out_dir.exists():
            os.rename(out_dir, old)
        os.rename(tmp, out_dir)
        fsync_dir(parent)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: Path, data: Any) -> None:
    """A JSON file inside a staged directory (the directory's rename is what makes it atomic)."""
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path} not found", "point at a Hugging Face model directory (config.json + weights)") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: invalid JSON: {e}", "the file is damaged; copy it again") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object", "a transformers-written file is one")
    return data


# --- weights ---------------------------------------------------------------------------------


def _owned(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor with its own storage (safetensors refuses tensors that share one)."""
    t = t.detach().contiguous()
    if t.storage_offset() != 0 or t.untyped_storage().nbytes() != t.numel() * t.element_size():
        t = t.clone()
    return t


def write_safetensors(out_dir: Path, tensors: Mapping[str, torch.Tensor], *, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[str]:
    """Write `tensors` as `model.safetensors`, or as numbered shards plus an index when larger
    than `max_shard_bytes`; returns the file names written."""
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = _owned(tensor)
        size += nbytes
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(out_dir / SAFETENSORS), metadata=metadata)
        return [SAFETENSORS]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for file_name, shard in zip(names, shards, strict=True):
        save_file(shard, str(out_dir / file_name), metadata=metadata)
        weight_map.update(dict.fromkeys(shard, file_name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    write_json(out_dir / SAFETENSORS_INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
    return [*names, SAFETENSORS_INDEX]


def _load_file(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise UserError(f"{path} not found, but the index names it", "copy every shard the index lists")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # safetensors and torch raise a variety of errors on a damaged file
        raise UserError(f"{path}: cannot read the weights: {type(e).__name__}: {e}", "the file is damaged; copy it again") from None


def read_hf_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an HF model directory: safetensors (single or indexed), else pytorch_model.bin."""
    for single, index in ((SAFETENSORS, SAFETENSORS_INDEX), (TORCH_BIN, TORCH_BIN_INDEX)):
        if (hf_dir / single).is_file():
            return _load_file(hf_dir / single)
        if (hf_dir / index).is_file():
            weight_map = read_json(hf_dir / index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise UserError(f"{hf_dir / index}: no weight_map", "a transformers-written index has one")
            out: dict[str, torch.Tensor] = {}
            for file_name in dict.fromkeys(weight_map.values()):
                out.update(_load_file(hf_dir / file_name))
            return out
    raise UserError(f"{hf_dir}: no weights ({SAFETENSORS}, {SAFETENSORS_INDEX}, {TORCH_BIN} or {TORCH_BIN_INDEX})",
                    "point at a Hugging Face model directory written by save_pretrained")


# --- tokenizer files --------------------------------------------------------------------------


def hf_tokenizer_files(src: Path) -> list[Path]:
    """The HF tokenizer files in `src` (empty when it holds no tokenizer.json)."""
    if not (src / "tokenizer.json").is_file():
        return []
    return [src / name for name in TOKENIZER_FILES if (src / name).is_file()]


def copy_files(files: list[Path], dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for path in files:
        shutil.copyfile(path, dest / path.name)


def write_tokenizer_files(dest: Path, tokenizer, *, model_max_length: int) -> None:
    """tokenizer.json + tokenizer_config.json + special_tokens_map.json for an llmforge tokenizer.

    Args:
        tokenizer: an `llmforge.data.tokenizers.HFTokenizer`; its special tokens name the
            bos/eos/pad tokens transformers should use.
    """
    (dest / "tokenizer.json").write_text(tokenizer.json, encoding="utf-8")
    specials = {f"{role}_token": token for role, token in tokenizer.specials.items() if token is not None}
    write_json(dest / "special_tokens_map.json", specials)
    write_json(dest / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "model_max_length": model_max_length,
        # llmforge tokenizes without adding special tokens; so should the user of the export.
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
    })
