"""The `prepare` stage: tokenizer and WebDataset shards, on global rank 0 only."""

from __future__ import annotations

from typing import Any

from llmforge.runtime.context import RunContext


def run(stage, *, context: RunContext) -> dict[str, Any]:
    from llmforge.data.prepare import run_prepare

    manifest: dict[str, Any] = {}
    if context.rank == 0:
        manifest = run_prepare(context.spec, context.run.path, stage, log=context.log)
    # Other ranks wait; the shards are read by everyone afterwards.
    context.barrier()
    return {"manifest": str(context.run.data / "manifest.json"), **_token_summary(manifest)}


def _token_summary(manifest: dict[str, Any]) -> dict[str, Any]:
    splits = manifest.get("splits") or {}
    return {f"{name}_tokens": info.get("tokens") for name, info in splits.items() if isinstance(info, dict)}
