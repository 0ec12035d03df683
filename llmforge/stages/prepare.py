"""The `prepare` stage: tokenizer and WebDataset shards, prepared by every process of the job together."""

from __future__ import annotations

from typing import Any

from llmforge.runtime.context import RunContext


def run(stage, *, context: RunContext) -> dict[str, Any]:
    from llmforge.data.prepare import Processes, run_prepare
    from llmforge.runtime.distributed import read_launch_env

    # Each process tokenizes a share of the corpus; rank 0 writes the shards, byte-identical to one process's.
    world = context.world_size
    processes = Processes(rank=context.rank, world_size=world, local_world_size=read_launch_env().local_world_size,
                          barrier=context.barrier)
    manifest = run_prepare(context.spec, context.run.path, stage, log=context.log, processes=processes)
    context.barrier()  # the shards are read by everyone afterwards
    return {"manifest": str(context.run.data / "manifest.json"), **_token_summary(manifest)}


def _token_summary(manifest: dict[str, Any]) -> dict[str, Any]:
    splits = manifest.get("splits") or {}
    return {f"{name}_tokens": info.get("tokens") for name, info in splits.items() if isinstance(info, dict)}
