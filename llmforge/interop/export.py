"""`llmforge export hf RUN_DIR|CHECKPOINT OUT_DIR`: a checkpoint as a Hugging Face model directory.

The checkpoint (any TP/PP layout) is loaded into a TP=1/PP=1 model in this process, its
tensors are mapped to HF names and layouts (`hf_mapping`), and the directory — config.json,
safetensors, tokenizer files, generation_config.json — is published atomically. A LoRA
checkpoint is merged, or with `peft=True` written as a PEFT adapter directory (`peft_export`).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmforge.interop.families import family_of_model
from llmforge.interop.hf_config import DTYPES, generation_config, to_hf_config
from llmforge.interop.import_ import MODEL_FRAGMENT
from llmforge.spec.components import GPTModel
from llmforge.spec.errors import UserError


@dataclass(frozen=True)
class Source:
    """A checkpoint to export and the run it belongs to."""

    step_dir: Path
    run_root: Path


def _is_step_dir(path: Path) -> bool:
    return (path / "COMPLETE").is_file() or (path / "model").is_dir()


def _stages_in_order(run_root: Path) -> list[str]:
    """Stage names, last first: the spec's order when there is one, else every checkpoint folder."""
    import yaml

    spec_path = run_root / "spec.resolved.yaml"
    if spec_path.is_file():
        spec = yaml.safe_load(spec_path.read_text()) or {}
        return [s["name"] for s in reversed(spec.get("stages") or []) if isinstance(s, dict) and "name" in s]
    root = run_root / "checkpoints"
    return sorted((p.name for p in root.iterdir() if p.is_dir()), reverse=True) if root.is_dir() else []


def find_source(path: Path, *, stage: str | None = None) -> Source:
    """The newest complete checkpoint that `path` (a run dir or a step dir) names.

    Args:
        stage: take this stage's checkpoint of a run dir; default the last stage that has one.
    """
    from llmforge.runtime.checkpoint import CheckpointManager, CorruptCheckpoint, verify

    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path} is not a directory", "pass a run dir or a checkpoint dir (<run>/checkpoints/<stage>/step-N)")
    if _is_step_dir(path):
        if path.parent.parent.name != "checkpoints":
            raise UserError(f"{path} is not inside <run_dir>/checkpoints/<stage>/, so its model spec cannot be found",
                            "export the run dir, or the checkpoint at its place in the run dir")
        try:
            verify(path)
        except CorruptCheckpoint as e:
            raise UserError(f"cannot export an incomplete or damaged checkpoint: {e}", "export an earlier, complete checkpoint") from None
        return Source(path, path.parent.parent.parent)
    stages = [stage] if stage else _stages_in_order(path)
    for name in stages:
        latest = CheckpointManager(path / "checkpoints" / name, keep_last=1, log=lambda m: print(m, file=sys.stderr)).latest()
        if latest is not None:
            return Source(latest, path)
    where = f"stage {stage!r} of {path}" if stage else str(path)
    raise UserError(f"no complete checkpoint in {where}", "run a training stage first, or pass a checkpoint dir")


def model_options(run_root: Path) -> GPTModel:
    """The `model:` section of the run (spec.resolved.yaml), or of an import (model.yaml)."""
    import yaml
    from pydantic import ValidationError

    for name in ("spec.resolved.yaml", MODEL_FRAGMENT):
        path = run_root / name
        if path.is_file():
            section = (yaml.safe_load(path.read_text()) or {}).get("model")
            break
    else:
        raise UserError(f"{run_root} holds neither spec.resolved.yaml nor {MODEL_FRAGMENT}, so the model's shape is unknown",
                        "export from inside the run dir that wrote the checkpoint")
    if not isinstance(section, dict):
        raise UserError(f"{path}: no `model:` section", "the file was edited; restore it")
    if section.get("name") != "gpt":
        raise UserError(f"{path}: model {section.get('name')!r} cannot be exported to Hugging Face",
                        "export supports the built-in `gpt` model")
    try:
        return GPTModel.model_validate({k: v for k, v in section.items() if k != "name"})
    except ValidationError as e:
        raise UserError(f"{path}: model section is not valid: {e.errors()[0]['msg']}") from None


def _tokenizer(run_root: Path, model: GPTModel):
    """The run's tokenizer (None when it has none), checked against the model's vocabulary."""
    from llmforge.data.pretrained import load_pretrained

    folder = run_root / "tokenizer"
    if not folder.is_dir() or not any(folder.iterdir()):
        return None
    tokenizer = load_pretrained(folder)
    if tokenizer.vocab_size > model.vocab_size:
        raise UserError(f"{folder}: the tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size is {model.vocab_size}",
                        "token ids past vocab_size have no embedding row; the tokenizer does not belong to this model")
    return tokenizer


def _parse_size(text: str | int) -> int:
    """'5GB', '500MB', '2GiB' or a byte count → bytes."""
    if isinstance(text, int):
        return text
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    raw = text.strip().upper()
    number = raw.rstrip("KMGIB")
    unit = raw[len(number):]
    try:
        value = int(float(number) * units[unit])
    except (ValueError, KeyError):
        raise UserError(f"--max-shard-size {text!r} is not a size", "write it like 5GB, 500MB or 2GiB") from None
    if value < 1:
        raise UserError(f"--max-shard-size {text!r} must be positive")
    return value


def write_model_dir(dest: Path, module, model: GPTModel, *, run_root: Path, tokenizer, dtype: str, max_bytes: int,
                    source: str) -> dict[str, Any]:
    """Write a TP=1 module's weights, config, generation config and tokenizer files into `dest`.

    `dest` lies inside a `staged_output`, which makes the whole directory appear at once.
    """
    import torch

    from llmforge.interop.hf_files import write_json, write_safetensors
    from llmforge.interop.hf_mapping import to_hf
    from llmforge.interop.model_io import state_of

    token_ids = {"bos": tokenizer.bos_id, "eos": tokenizer.eos_id, "pad": tokenizer.pad_id} if tokenizer else {}
    dest.mkdir(parents=True, exist_ok=True)
    tensors = to_hf(state_of(module), model, source=source)
    torch_dtype = getattr(torch, dtype)
    tensors = {name: t.to(device="cpu", dtype=torch_dtype) for name, t in tensors.items()}
    files = write_safetensors(dest, tensors, max_shard_bytes=max_bytes)
    write_json(dest / "config.json", to_hf_config(model, token_ids=token_ids, dtype=dtype))
    write_json(dest / "generation_config.json", generation_config(token_ids))
    if tokenizer is not None:
        write_tokenizer(dest, tokenizer, run_root=run_root, model=model)
    return {"tensors": len(tensors), "parameters": sum(t.numel() for t in tensors.values()), "dtype": dtype,
            "weight_files": files, "tokenizer": tokenizer is not None}


def write_tokenizer(dest: Path, tokenizer, *, run_root: Path, model: GPTModel) -> None:
    """The run's tokenizer as HF tokenizer files in `dest`."""
    from llmforge.interop.hf_files import copy_files, hf_tokenizer_files, write_tokenizer_files

    tok_dir = run_root / "tokenizer"
    if (tok_dir / "meta.json").is_file() and not tokenizer.files:
        write_tokenizer_files(dest, tokenizer, model_max_length=model.max_positions)
    else:  # an imported HF tokenizer: its own files, untouched
        copy_files(hf_tokenizer_files(tok_dir), dest)


def export_hf(source: str | Path, out_dir: str | Path, *, stage: str | None = None, dtype: str = "float32",
              max_shard_size: str | int = "5GB", overwrite: bool = False, peft: bool = False) -> dict[str, Any]:
    """Write the checkpoint `source` names as an HF model directory `out_dir`; returns a summary.

    Args:
        dtype: the weights' dtype in the export (llmforge keeps fp32 master weights).
        max_shard_size: safetensors files larger than this are split, with an index.
        peft: for a `lora` stage's checkpoint, write its adapters as a PEFT adapter directory
            and its frozen base model into `out_dir/base` (see `peft_export`), instead of merging.
    """
    from llmforge.interop.hf_files import staged_output
    from llmforge.interop.model_io import load_module_weights, single_process_model

    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r} is not supported", f"use one of {', '.join(DTYPES)}")
    max_bytes = _parse_size(max_shard_size)
    src = find_source(Path(source), stage=stage)
    model = model_options(src.run_root)
    family = family_of_model(model)
    tokenizer = _tokenizer(src.run_root, model)
    out_dir = Path(out_dir)
    head = {"out_dir": str(out_dir), "architecture": family.hf_class, "checkpoint": str(src.step_dir)}
    if peft:
        from llmforge.interop.peft_export import export_peft

        return {**head, **export_peft(src, model, tokenizer, out_dir, dtype=dtype, max_bytes=max_bytes, overwrite=overwrite)}
    with staged_output(out_dir, overwrite=overwrite) as tmp:
        module = single_process_model(model)
        load_module_weights(src.step_dir, module)  # a LoRA checkpoint of adapters alone is merged on load
        written = write_model_dir(tmp, module, model, run_root=src.run_root, tokenizer=tokenizer, dtype=dtype, max_bytes=max_bytes,
                                  source=str(src.step_dir))
    return {**head, **written}
