"""Tokens, steps and epochs of each stage: from the prepared manifest, else from the spec.

The step count follows the training loop's own rule (`llmforge.runtime.train.total_steps`):
`max_tokens` rounds up to whole steps of global_batch_size × seq_length tokens, and
`max_epochs` counts samples of the train split. Without a manifest the size of an epoch
is estimated from the input files when they exist here, and said to be an estimate.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# Bytes of raw text per token: byte-level BPE on English prose and code averages about 4
# (GPT-2 and Llama tokenizers both); char and byte tokenizers emit one per character or byte.
BYTES_PER_TOKEN = {"bpe": 4.0, "pretrained": 4.0, "char": 1.0, "byte": 1.0}
# Counting JSONL examples reads the files; past this many bytes the rest is extrapolated.
_COUNT_LIMIT = 64 * 2**20


@dataclass
class StageBudget:
    """What one stage processes. Fields a stage does not have stay None."""

    name: str
    type: str
    source: str  # "manifest", "spec", "estimate" or "unknown"
    note: str
    micro_batch_size: int | None = None
    global_batch_size: int | None = None
    tokens_per_step: int | None = None
    steps: int | None = None
    tokens: int | None = None
    epochs: float | None = None
    samples_per_epoch: int | None = None
    dataset_tokens: int | None = None  # prepare: tokens it writes; training: train-split tokens

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_manifest(run_dir: Path) -> dict | None:
    """The data manifest of a run dir, or None when there is no readable one of version 1."""
    path = Path(run_dir) / "data" / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return manifest if manifest.get("version") == 1 and "splits" in manifest else None


def _files_bytes(sources: dict[str, Any]) -> tuple[int, int, list[Path]]:
    """(files, bytes, paths) of the file sources that exist here."""
    from llmforge.data.errors import ErrorPolicy
    from llmforge.data.files import resolve_files

    paths: list[Path] = []
    for name, src in sources.items():
        patterns = getattr(src, "paths", None)
        if patterns:
            paths += resolve_files(patterns, getattr(src, "exclude", []), ErrorPolicy("skip", log=None), name)
    total = 0
    for p in paths:
        try:
            total += p.stat().st_size
        except OSError:
            pass
    return len(paths), total, paths


def _count_lines(paths: list[Path]) -> int:
    """JSONL records in `paths`, extrapolated from the first _COUNT_LIMIT bytes."""
    lines = read = total = 0
    for p in paths:
        size = p.stat().st_size
        total += size
        if read >= _COUNT_LIMIT:
            continue
        with open(p, "rb") as f:
            while (block := f.read(1 << 20)) and read < _COUNT_LIMIT:
                lines += block.count(b"\n")
                read += len(block)
    return lines if read >= total else round(lines * total / max(read, 1))


def _steps(train: Any, tokens_per_step: int, samples: int | None) -> int | None:
    if train.max_steps is not None:
        return train.max_steps
    if train.max_tokens is not None:
        return math.ceil(train.max_tokens / tokens_per_step)
    if samples is None:
        return None
    return max(1, math.ceil(train.max_epochs * samples / train.global_batch_size))


def _training(stage: Any, seq: int, data: tuple[int | None, int | None, str, str]) -> StageBudget:
    """The budget of a training stage; `data` is (samples per epoch, tokens, source, note) of its data."""
    train = stage.train
    samples, dataset_tokens, data_source, note = data
    tokens_per_step = train.global_batch_size * seq
    steps = _steps(train, tokens_per_step, samples)
    if train.max_epochs is None:
        source = "spec"  # the step count does not depend on the data
    elif steps is None:
        source, note = "unknown", f"max_epochs needs the size of the data: {note}"
    else:
        source = data_source
    return StageBudget(
        name=stage.name, type=stage.type, source=source, note=note,
        micro_batch_size=train.micro_batch_size, global_batch_size=train.global_batch_size, tokens_per_step=tokens_per_step,
        steps=steps, tokens=None if steps is None else steps * tokens_per_step,
        epochs=None if steps is None or not samples else steps * train.global_batch_size / samples,
        samples_per_epoch=samples, dataset_tokens=dataset_tokens,
    )


def _pretrain_data(spec: Any, manifest: dict | None, seq: int) -> tuple[int | None, int | None, str, str]:
    """(samples per epoch, train tokens, source, note) of the pretraining data."""
    if manifest is not None:
        train = manifest["splits"]["train"]
        return train["samples"], train["tokens"], "manifest", "from the prepared manifest"
    files, size, _ = _files_bytes(spec.data.sources)
    if not files:
        return None, None, "spec", "no prepared data and no input files here"
    per_token = BYTES_PER_TOKEN.get(spec.tokenizer.name, 4.0)
    tokens = round(size / per_token * (1 - spec.data.split.val_fraction))
    note = f"estimated from {files} files, {size / 1e6:,.1f} MB at ~{per_token:g} bytes per token; `prepare` counts exactly"
    return tokens // (seq + 1), tokens, "estimate", note


def _sft_data(stage: Any) -> tuple[int | None, str, str]:
    """(train examples, source, note) of a finetune stage's instruction files."""
    files, size, paths = _files_bytes(stage.data.sources)
    if not files:
        return None, "spec", "its instruction files are not here"
    examples = round(_count_lines(paths) * (1 - stage.data.val_fraction))
    return examples, "estimate", f"{examples:,} train examples counted in {files} files; each padded to the stage's length"


def stage_budgets(spec: Any, run_dir: Path) -> list[StageBudget]:
    """One StageBudget per stage, in order."""
    manifest = read_manifest(run_dir)
    seq = manifest["seq_length"] if manifest else spec.model.seq_length
    cache: dict[str, tuple] = {}

    def pretrain_data() -> tuple[int | None, int | None, str, str]:
        if "data" not in cache:
            cache["data"] = _pretrain_data(spec, manifest, seq)
        return cache["data"]

    out: list[StageBudget] = []
    for stage in spec.stages:
        train = getattr(stage, "train", None)
        if train is None:
            if stage.type == "prepare":
                samples, tokens, source, note = pretrain_data()
                out.append(StageBudget(name=stage.name, type=stage.type, source=source, note=note, samples_per_epoch=samples,
                                       dataset_tokens=tokens))
            else:
                out.append(StageBudget(name=stage.name, type=stage.type, source="spec", note="does not train"))
        elif hasattr(getattr(stage, "data", None), "sources"):
            # A finetune stage reads its own files; counting them is only needed for max_epochs. Its
            # rows are its own length, two per preference pair (what the runtime counts).
            from llmforge.plan.finetune import PAIRS, sequence_length

            per_example = sequence_length(spec.model, stage) * (2 if stage.type in PAIRS else 1)
            if train.max_epochs:
                samples, source, note = _sft_data(stage)
                out.append(_training(stage, per_example, (samples, None, source, note)))
            else:
                out.append(_training(stage, per_example, (None, None, "spec", "")))
        else:
            out.append(_training(stage, seq, pretrain_data()))
    return out
