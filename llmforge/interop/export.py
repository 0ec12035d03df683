"""`llmforge export hf RUN_DIR|CHECKPOINT OUT_DIR`: a checkpoint as a Hugging Face model directory.

The family's own class and config: an import's record (`hf_source.json`, of the run or of the
import a stage's `init_from` names) says which, else the model's shape does. A full checkpoint
(any TP/PP layout) is read a layer at a time and its HF tensors written one by one
(`streaming`); a LoRA checkpoint is merged in one TP=1 model, or with `peft=True` written as a
PEFT adapter directory (`peft_export`). Before the directory is published (atomically),
transformers loads it and must compute llmforge's logits (`verify`), unless `verify=False`.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmforge.interop.families import FAMILIES, family_of_model
from llmforge.interop.families.base import Family
from llmforge.interop.hf_config import DTYPES, generation_config, to_hf_config, validated_model
from llmforge.interop.import_ import MODEL_FRAGMENT, SOURCE_RECORD, SOURCE_VERSION
from llmforge.spec.components import GPTModel
from llmforge.spec.errors import UserError

if TYPE_CHECKING:
    import torch

    from llmforge.interop.verify import Verdict

GENERATION_CONFIG = "generation_config.json"


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


def read_record(run_root: Path) -> dict[str, Any] | None:
    """The import record in `run_root` (None when it has none); an unknown version fails loudly."""
    from llmforge.interop.hf_files import read_json

    path = run_root / SOURCE_RECORD
    if not path.is_file():
        return None
    record = read_json(path)
    if record.get("version") != SOURCE_VERSION:
        raise UserError(f"{path}: unknown record version {record.get('version')!r}", f"this llmforge reads version {SOURCE_VERSION}")
    return record


def _run_of(checkpoint: str) -> Path | None:
    """The run dir of a checkpoint path a stage's `init_from` names (None for a stage name)."""
    path = Path(checkpoint)
    if not path.is_dir():
        return None
    return path.parent.parent.parent if path.parent.parent.name == "checkpoints" else path


def import_record(run_root: Path, *, depth: int = 4) -> dict[str, Any] | None:
    """The record of the import the run came from: its own (an import's directory), else that of the run
    a stage's `init_from` checkpoint belongs to, followed back a few runs."""
    import yaml

    record = read_record(run_root)
    spec_path = run_root / "spec.resolved.yaml"
    if record is not None or depth == 0 or not spec_path.is_file():
        return record
    for stage in (yaml.safe_load(spec_path.read_text()) or {}).get("stages") or []:
        origin = _run_of(stage["init_from"]) if isinstance(stage, dict) and isinstance(stage.get("init_from"), str) else None
        if origin is not None and origin.resolve() != run_root.resolve():
            found = import_record(origin, depth=depth - 1)
            if found is not None:
                return found
    return None


@dataclass(frozen=True)
class Target:
    """What an export writes: the model, the HF family it is written as, and the import record it follows (if any)."""

    model: GPTModel
    family: Family
    record: dict[str, Any] | None

    def config(self, *, token_ids: dict[str, int | None], dtype: str) -> dict[str, Any]:
        """`config.json`: the imported one as it was (dtype aside) when it still describes the model, else the family's own."""
        record = self.record
        if record is not None and record.get("family") == self.family.name:
            original = record["config"]
            try:
                theirs = validated_model({"name": "gpt", **self.family.from_config(original, SOURCE_RECORD)}, SOURCE_RECORD)
            except UserError:
                theirs = None
            if theirs is not None and self.family.to_config(theirs) == self.family.to_config(self.model):
                return {**original, "torch_dtype": dtype, "dtype": dtype}
        return to_hf_config(self.model, token_ids=token_ids, dtype=dtype, family=self.family)


def export_target(run_root: Path, model: GPTModel) -> Target:
    """The family to write: the import record's when the model still fits it, else the one the model's shape picks."""
    record = import_record(run_root)
    family = FAMILIES.get(record.get("family", "")) if record else None
    if family is None or family.misfits(model):
        family, record = family_of_model(model), None
    return Target(model, family, record)


def default_dtype(run_root: Path) -> str:
    """fp32 (llmforge's master weights), or the dtype the weights were imported in when exporting an import itself."""
    record = read_record(run_root)
    dtypes = record.get("source_dtypes") if record else None
    return dtypes[0] if dtypes and len(dtypes) == 1 and dtypes[0] in DTYPES else "float32"


def hf_weight_groups(target: Target, megatron: Callable[[str], torch.Tensor], dtype: str):
    """The HF tensors of each megatron tensor, planned (names, shapes, dtype) and made on demand from `megatron(name)`."""
    import torch

    from llmforge.interop.families.base import dims
    from llmforge.interop.hf_files import Planned
    from llmforge.interop.hf_mapping import link_to_hf

    torch_dtype, d = getattr(torch, dtype), dims(target.model)
    groups = []
    for link in target.family.links(target.model):
        planned = tuple(Planned(name, shape, torch_dtype) for name, shape in zip(link.hf, link.hf_shapes, strict=True))
        groups.append((planned, lambda link=link: tuple(t.to(torch_dtype) for t in link_to_hf(link, megatron(link.megatron), d))))
    return groups


def write_model_dir(dest: Path, megatron: Callable[[str], torch.Tensor], target: Target, *, run_root: Path, tokenizer, dtype: str,
                    max_bytes: int) -> dict[str, Any]:
    """Write a model's weights (each megatron tensor from `megatron(canonical name)`), config, generation config and
    tokenizer files into `dest`, which lies inside a `staged_output`."""
    from llmforge.interop.hf_files import write_json, write_safetensors_streamed

    token_ids = {"bos": tokenizer.bos_id, "eos": tokenizer.eos_id, "pad": tokenizer.pad_id} if tokenizer else {}
    dest.mkdir(parents=True, exist_ok=True)
    groups = hf_weight_groups(target, megatron, dtype)
    files = write_safetensors_streamed(dest, groups, max_shard_bytes=max_bytes)
    write_json(dest / "config.json", target.config(token_ids=token_ids, dtype=dtype))
    if not _copy_generation_config(run_root, tokenizer, dest):
        write_json(dest / GENERATION_CONFIG, generation_config(token_ids))
    if tokenizer is not None:
        write_tokenizer(dest, tokenizer, run_root=run_root, model=target.model)
    return {"tensors": sum(len(planned) for planned, _ in groups), "dtype": dtype, "weight_files": files,
            "parameters": sum(math.prod(link.megatron_shape) for link in target.family.links(target.model)),
            "tokenizer": tokenizer is not None}


def _copy_generation_config(run_root: Path, tokenizer, dest: Path) -> bool:
    """An imported tokenizer's `generation_config.json`, byte for byte (Llama 3 Instruct's list of eos ids survives)."""
    import shutil

    source = run_root / "tokenizer" / GENERATION_CONFIG
    if tokenizer is None or not tokenizer.files or not source.is_file():
        return False
    shutil.copyfile(source, dest / GENERATION_CONFIG)
    return True


def write_tokenizer(dest: Path, tokenizer, *, run_root: Path, model: GPTModel) -> None:
    """The run's tokenizer as HF tokenizer files in `dest`."""
    from llmforge.interop.hf_files import copy_files, hf_tokenizer_files, write_tokenizer_files

    tok_dir = run_root / "tokenizer"
    if (tok_dir / "meta.json").is_file() and not tokenizer.files:
        write_tokenizer_files(dest, tokenizer, model_max_length=model.max_positions)
    else:  # an imported HF tokenizer: its own files, untouched
        copy_files(hf_tokenizer_files(tok_dir), dest)


def self_check(check: Callable[[torch.Tensor], Verdict], model: GPTModel, *, needs: tuple[str, ...],
               log: Callable[[str], None]) -> dict[str, Any] | None:
    """Run `check` on the fixed sequences (see `verify`), refusing to publish above the tolerance; None when skipped."""
    from llmforge.interop.verify import ExportCheckFailed, check_ids, missing_library, refuse_unless_passed

    missing = missing_library(*needs)
    if missing is not None:
        log(f"self-check skipped: {missing} is not installed (pip install {missing} to check the export against it)")
        return None
    try:
        verdict = check(check_ids(model.vocab_size, model.max_positions))
    except ExportCheckFailed:
        raise
    except Exception as e:  # transformers refusing to load or run the files is the check failing, not a crash
        raise ExportCheckFailed(f"self-check: the export could not be loaded and run: {type(e).__name__}: {e}; nothing was written "
                                "(`--no-verify` publishes it anyway)") from e
    log(verdict.line())
    refuse_unless_passed(verdict)
    return verdict.as_dict()


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def export_hf(source: str | Path, out_dir: str | Path, *, stage: str | None = None, dtype: str | None = None,
              max_shard_size: str | int = "5GB", overwrite: bool = False, peft: bool = False, verify: bool = True,
              log: Callable[[str], None] = _stderr) -> dict[str, Any]:
    """Write the checkpoint `source` names as an HF model directory `out_dir`; returns a summary.

    Args:
        dtype: the weights' dtype in the export (default: float32, llmforge's master weights, or
            the imported dtype when `source` is an import itself, so that a round trip is exact).
        max_shard_size: safetensors files larger than this are split, with an index.
        peft: for a `lora` stage's checkpoint, write its adapters as a PEFT adapter directory
            and its frozen base model into `out_dir/base` (see `peft_export`), instead of merging.
        verify: check the written files with transformers before publishing them (`verify`);
            a failed check raises `verify.ExportCheckFailed` and publishes nothing.
        log: where the self-check's line goes.
    """
    from llmforge.interop.hf_files import staged_output

    if dtype is not None and dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r} is not supported", f"use one of {', '.join(DTYPES)}")
    max_bytes = _parse_size(max_shard_size)
    src = find_source(Path(source), stage=stage)
    model = model_options(src.run_root)
    target = export_target(src.run_root, model)
    dtype = dtype or default_dtype(src.run_root)
    tokenizer = _tokenizer(src.run_root, model)
    out_dir = Path(out_dir)
    head = {"out_dir": str(out_dir), "architecture": target.family.hf_class, "checkpoint": str(src.step_dir)}
    if peft:
        from llmforge.interop.peft_export import export_peft

        return {**head, **export_peft(src, target, tokenizer, out_dir, dtype=dtype, max_bytes=max_bytes, overwrite=overwrite,
                                      verify=verify, log=log)}
    with staged_output(out_dir, overwrite=overwrite) as tmp:
        if (src.step_dir / "model").is_dir():
            written, check = _export_streamed(tmp, src, target, tokenizer=tokenizer, dtype=dtype, max_bytes=max_bytes)
        else:
            written, check = _export_in_memory(tmp, src, target, tokenizer=tokenizer, dtype=dtype, max_bytes=max_bytes)
        verdict = self_check(check, model, needs=("transformers",), log=log) if verify else None
    return {**head, **written, "check": verdict}


def _export_streamed(tmp: Path, src: Source, target: Target, *, tokenizer, dtype: str, max_bytes: int):
    """A full checkpoint, read a layer at a time; the check runs llmforge's forward the same way."""
    from llmforge.interop.model_io import skeleton_model
    from llmforge.interop.streaming import CheckpointReader, streamed_logits
    from llmforge.interop.verify import compare, transformers_logits

    skeleton = skeleton_model(target.model)
    reader = CheckpointReader(src.step_dir / "model", skeleton)
    written = write_model_dir(tmp, reader.get, target, run_root=src.run_root, tokenizer=tokenizer, dtype=dtype, max_bytes=max_bytes)
    reader.clear()

    def check(ids):
        import torch

        # llmforge's side first, freed layer by layer: the two models never coexist.
        ours = streamed_logits(skeleton, reader, ids, rounded_to=getattr(torch, dtype))
        return compare(ours, transformers_logits(tmp, ids, dtype=dtype), what=f"transformers {target.family.hf_class}")

    return written, check


def _export_in_memory(tmp: Path, src: Source, target: Target, *, tokenizer, dtype: str, max_bytes: int):
    """A LoRA checkpoint of adapters alone, merged into its base on load, in one TP=1 model."""
    from llmforge.interop.hf_mapping import canonical_megatron
    from llmforge.interop.model_io import load_module_weights, single_process_model, state_of
    from llmforge.interop.verify import compare, round_weights, transformers_logits

    module = single_process_model(target.model)
    load_module_weights(src.step_dir, module)
    state = canonical_megatron(state_of(module))
    written = write_model_dir(tmp, state.__getitem__, target, run_root=src.run_root, tokenizer=tokenizer, dtype=dtype,
                              max_bytes=max_bytes)

    def check(ids):
        round_weights(module, dtype)
        ours = forward_logits(module, ids)
        return compare(ours, transformers_logits(tmp, ids, dtype=dtype), what=f"transformers {target.family.hf_class}")

    return written, check


def forward_logits(module: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """llmforge's own forward pass of a whole TP=1 model: full logits [batch, seq, vocab], fp32."""
    import torch

    module.eval()
    ids = ids.to(next(module.parameters()).device)
    positions = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0).expand_as(ids)
    with torch.no_grad():
        return module(ids, positions, None).float().cpu()
