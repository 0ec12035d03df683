"""The files of an HF model directory: safetensors (sharded with an index; read and written a
tensor at a time), tokenizer files, and the atomic publication of a whole output directory.

An output directory is built in a hidden sibling (`.NAME.tmp-PID`), fsynced, and renamed
into place only when every file is written, so a reader never sees half an export or
half an import, and a failed one leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
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

# safetensors' dtype names (the header's "dtype").
_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64", torch.int64: "I64",
              torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}
_ST_NAMES = {name: dtype for dtype, name in _ST_DTYPES.items()}


@dataclass(frozen=True)
class Planned:
    """One tensor a streamed safetensors write will hold: its name, shape and dtype, known before its data."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


# A group of tensors made together (a fused megatron tensor's q, k, v) and the function that makes them.
Group = tuple[Sequence[Planned], Callable[[], Sequence[torch.Tensor]]]


def _write_one_file(path: Path, groups: Sequence[Group]) -> None:
    """A safetensors file whose header is written first, from the plan; each group's data follows as it is made."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for planned, _ in groups:
        for t in planned:
            header[t.name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
            offset += t.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for planned, make in groups:
            tensors = make()
            for t, tensor in zip(planned, tensors, strict=True):
                if tuple(tensor.shape) != t.shape or tensor.dtype != t.dtype:
                    raise RuntimeError(f"{t.name}: made {tuple(tensor.shape)} {tensor.dtype}, planned {t.shape} {t.dtype}")
                f.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
            del tensors


def write_safetensors_streamed(out_dir: Path, groups: Sequence[Group], *, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[str]:
    """Write the groups' tensors as `model.safetensors`, or as numbered shards plus an index past
    `max_shard_bytes` (a group stays in one file); returns the file names written.

    Each group's tensors are made only when their turn comes and dropped once written, so the
    whole model never has to be in memory.
    """
    shards: list[list[Group]] = [[]]
    size = 0
    for group in groups:
        nbytes = sum(t.nbytes for t in group[0])
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(group)
        size += nbytes
    if len(shards) == 1:
        _write_one_file(out_dir / SAFETENSORS, shards[0])
        return [SAFETENSORS]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for file_name, shard in zip(names, shards, strict=True):
        _write_one_file(out_dir / file_name, shard)
        weight_map.update({t.name: file_name for planned, _ in shard for t in planned})
    total = sum(t.nbytes for planned, _ in groups for t in planned)
    write_json(out_dir / SAFETENSORS_INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
    return [*names, SAFETENSORS_INDEX]


def write_safetensors(out_dir: Path, tensors: Mapping[str, torch.Tensor], *, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[str]:
    """Write tensors already in memory (see `write_safetensors_streamed`)."""
    groups = [((Planned(name, tuple(t.shape), t.dtype),), lambda t=t: (t,)) for name, t in tensors.items()]
    return write_safetensors_streamed(out_dir, groups, max_shard_bytes=max_shard_bytes)


def _damaged(path: Path, e: Exception) -> UserError:
    return UserError(f"{path}: cannot read the weights: {type(e).__name__}: {e}", "the file is damaged; copy it again")


class HFWeights:
    """The tensors of an HF model directory (safetensors, single or indexed, else pytorch_model.bin),
    read one at a time: names, shapes and dtypes come from the headers, data only when asked for.

    A safetensors file is opened anew for each tensor, so that no mapping of the whole file
    stays resident; the whole checkpoint is never in memory at once.
    """

    def __init__(self, hf_dir: Path) -> None:
        self.hf_dir = Path(hf_dir)
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        self._file: dict[str, Path] = {}
        self._loaded: dict[str, torch.Tensor] = {}  # pytorch_model.bin (mmap'd when it can be)
        for name in self._weight_files():
            path = self.hf_dir / name
            if not path.is_file():
                raise UserError(f"{path} not found, but the index names it", "copy every shard the index lists")
            if path.suffix == ".safetensors":
                self._scan_safetensors(path)
            else:
                self._load_bin(path)

    def _weight_files(self) -> list[str]:
        for single, index in ((SAFETENSORS, SAFETENSORS_INDEX), (TORCH_BIN, TORCH_BIN_INDEX)):
            if (self.hf_dir / single).is_file():
                return [single]
            if (self.hf_dir / index).is_file():
                weight_map = read_json(self.hf_dir / index).get("weight_map")
                if not isinstance(weight_map, dict):
                    raise UserError(f"{self.hf_dir / index}: no weight_map", "a transformers-written index has one")
                return list(dict.fromkeys(weight_map.values()))
        raise UserError(f"{self.hf_dir}: no weights ({SAFETENSORS}, {SAFETENSORS_INDEX}, {TORCH_BIN} or {TORCH_BIN_INDEX})",
                        "point at a Hugging Face model directory written by save_pretrained")

    def _scan_safetensors(self, path: Path) -> None:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    view = f.get_slice(name)
                    self.shapes[name], self.dtypes[name] = tuple(view.get_shape()), _ST_NAMES[view.get_dtype()]
                    self._file[name] = path
        except Exception as e:  # safetensors raises a variety of errors on a damaged file
            raise _damaged(path, e) from None

    def _load_bin(self, path: Path) -> None:
        try:
            try:
                tensors = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # the legacy (non-zip) format cannot be mapped
                tensors = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise _damaged(path, e) from None
        for name, tensor in tensors.items():
            self._loaded[name] = tensor
            self.shapes[name], self.dtypes[name] = tuple(tensor.shape), tensor.dtype

    def get(self, name: str) -> torch.Tensor:
        """One tensor, as the file stores it."""
        if name in self._loaded:
            return self._loaded[name]
        from safetensors import safe_open

        path = self._file[name]
        try:
            with safe_open(str(path), framework="pt") as f:
                return f.get_tensor(name)
        except Exception as e:
            raise _damaged(path, e) from None


def read_hf_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an HF model directory, in memory (small models and tests; conversions stream `HFWeights`)."""
    weights = HFWeights(hf_dir)
    return {name: weights.get(name) for name in weights.shapes}


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
