"""What a finetune checkpoint holds, and how any of them becomes a model's weights.

A full checkpoint has `model/`. A LoRA stage's checkpoints hold `adapters/` (the adapters
and their optimizer state: small) and `lora.json`, which names the base checkpoint and the
adapter shape; its final one also has the merged `model/` unless `merge: false`. A prompt
tuning checkpoint holds `prompt/` and `prompt.json`. `load_weights` turns any of them into
weights for `init_from` and `llmforge generate`; a LoRA one without `model/` is merged on
the fly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llmforge.runtime.training import StageHooks
from llmforge.spec.errors import UserError

LORA_META = "lora.json"
PROMPT_META = "prompt.json"
META_VERSION = 1


def run_root(step_dir: Path) -> Path:
    """<run>/checkpoints/<stage>/step-N → <run>."""
    return step_dir.parent.parent.parent


def base_reference(base: Path, run_dir: Path) -> str:
    """How a checkpoint names its base: relative to its run dir when inside it (the run may move)."""
    try:
        return str(base.resolve().relative_to(run_dir.resolve()))
    except ValueError:
        return str(base.resolve())


def write_meta(path: Path, meta: dict[str, Any]) -> None:
    from llmforge.atomic import atomic_write_text

    atomic_write_text(path, json.dumps({"version": META_VERSION, **meta}, indent=1) + "\n")


def read_meta(path: Path) -> dict[str, Any]:
    meta = json.loads(path.read_text())
    if meta.get("version") != META_VERSION:
        raise UserError(f"{path} has version {meta.get('version')}; this llmforge reads {META_VERSION}")
    return meta


def base_of(step_dir: Path, meta: dict[str, Any]) -> Path:
    base = Path(meta["base"])
    return base if base.is_absolute() else run_root(step_dir) / base


def load_weights(step_dir: Path, model_chunks: list) -> None:
    """Load the model weights a checkpoint stands for into plain (unadapted) chunks; a collective."""
    from llmforge.runtime.sharded_io import load_sharded

    step_dir = Path(step_dir)
    if (step_dir / "model").is_dir():
        load_sharded(step_dir / "model", model_chunks, None)
        return
    if (step_dir / LORA_META).is_file():
        meta = read_meta(step_dir / LORA_META)
        load_weights(base_of(step_dir, meta), model_chunks)
        fold_lora(step_dir, meta, model_chunks)
        return
    if (step_dir / PROMPT_META).is_file():
        raise UserError(f"{step_dir} is a prompt_tuning checkpoint: it holds a soft prompt for a frozen model, not model weights",
                        "start from the prompt_tuning stage's own init_from, or use `llmforge generate` with this checkpoint")
    raise UserError(f"{step_dir} holds no model weights (no model/ directory)", "point init_from at a training stage's checkpoint")


class AnyCheckpointInit(StageHooks):
    """StageHooks whose init_from may be any checkpoint that stands for model weights: a full one,
    or a LoRA one (adapters folded into their base on load)."""

    def init_weights(self, source: Path, chunks: list) -> None:
        load_weights(source, chunks)


def attach_lora_from(meta: dict[str, Any], model_chunks: list):
    from llmforge.finetune.lora import attach_lora

    return attach_lora(model_chunks, targets=meta["target_modules"], rank=meta["rank"], alpha=meta["alpha"], dropout=0.0,
                       seed=meta["seed"])


def fold_lora(step_dir: Path, meta: dict[str, Any], model_chunks: list) -> None:
    """Add the saved adapters' (α / r) B A into the chunks' weights; the chunks stay plain."""
    import torch

    from llmforge.finetune.lora import PREFIX, is_adapter_key, merge
    from llmforge.runtime.sharded_io import load_sharded

    attached = attach_lora_from(meta, model_chunks)
    load_sharded(step_dir / "adapters", model_chunks, None, select=is_adapter_key)
    with torch.no_grad():
        for item in attached:
            item.linear.weight.copy_(merge(item.linear.weight, item.adapter))
            item.hook.remove()
    for chunk in model_chunks:
        for module in list(chunk.modules()):
            for name in [n for n, _ in module.named_children() if n.startswith(PREFIX)]:
                delattr(module, name)
        for param in chunk.parameters():
            param.requires_grad_(True)


def attach_prompt_from(step_dir: Path, model_chunks: list):
    """Give plain chunks the soft prompt saved in a prompt_tuning checkpoint (for generation)."""
    from llmforge.finetune.prompt import attach_soft_prompt, is_prompt_key
    from llmforge.runtime.sharded_io import load_sharded

    meta = read_meta(step_dir / PROMPT_META)
    load_weights(base_of(step_dir, meta), model_chunks)
    prompt = attach_soft_prompt(model_chunks, num_virtual_tokens=meta["num_virtual_tokens"], init="random", token_ids=[], seed=0)
    load_sharded(step_dir / "prompt", model_chunks, None, select=is_prompt_key)
    return prompt, meta


class PartialCheckpoints(AnyCheckpointInit):
    """The hooks of a frozen-base stage: its checkpoints hold only the trained entries (and their optimizer state).

    Args:
        folder: where the entries go in a step dir (`adapters`, `prompt`).
        select: which model state-dict entries are trained (`is_adapter_key`, `is_prompt_key`).
        meta_name, meta: the record that says how to rebuild the model (base checkpoint, shape).
        merge_final: also write the merged full `model/` into the stage's final checkpoint.
    """

    def __init__(self, *, folder: str, select, meta_name: str, meta: dict[str, Any], rank: int, merge_final: bool = False):
        self.folder, self.select, self.meta_name, self.meta = folder, select, meta_name, meta
        self.rank, self.merge_final = rank, merge_final

    def save(self, tmp: Path, model_chunks: list, optimizer, *, final: bool) -> None:
        from llmforge.runtime.sharded_io import save_sharded, write_sharded

        (tmp / self.folder).mkdir(parents=True, exist_ok=True)
        save_sharded(tmp / self.folder, model_chunks, optimizer, {}, select=self.select)
        if self.rank == 0:
            write_meta(tmp / self.meta_name, self.meta)
        if final and self.merge_final:
            from llmforge.finetune.lora import merged_state

            (tmp / "model").mkdir(parents=True, exist_ok=True)
            write_sharded(tmp / "model", {"model": merged_state(model_chunks), "common": {}})

    def load(self, step_dir: Path, model_chunks: list, optimizer) -> None:
        from llmforge.runtime.sharded_io import load_sharded

        load_sharded(step_dir / self.folder, model_chunks, optimizer, select=self.select)
