"""Run the plan's stages in order; each hands its outputs to the next through the run dir.

A finished stage is not rerun on `--resume`; the stage that was running resumes from its
newest complete checkpoint.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from llmforge.registry.components import Registry
from llmforge.runtime.launch import READY_ENV, RESUMING_ENV
from llmforge.runtime.metrics import Log
from llmforge.runtime.rundir import RunDir, environment_record
from llmforge.spec.schema import Spec


def _rank() -> int:
    return int(os.environ.get("RANK", 0))


def prepare_run_dir(spec: Spec, resolved: dict, plan: dict, run_dir: Path, *, resume: bool | None, overwrite: bool,
                    allow_spec_change: bool) -> tuple[RunDir, bool]:
    """Apply the run-dir rules and write the records. `resume=None` means resume-or-start."""
    run = RunDir(run_dir)
    if resume is None:
        resume = run.is_used() and (run.path / "spec.resolved.yaml").exists()
    resuming = run.prepare(resolved, resume=resume, overwrite=overwrite, allow_spec_change=allow_spec_change)
    layout = spec.parallelism.model_dump()
    if not resuming or allow_spec_change:
        run.write_records(resolved, plan, environment_record(layout))
    return run, resuming


def execute(spec: Spec, resolved: dict, plan: dict, registry: Registry, *, run_dir: Path, resume: bool | None,
            overwrite: bool, allow_spec_change: bool) -> dict[str, Any]:
    from llmforge.runtime.context import RunContext
    from llmforge.runtime.distributed import check_world_size, read_launch_env

    launched = read_launch_env()
    if launched.launcher != "none":  # the user's own torchrun or srun: refused before any work
        check_world_size(spec.parallelism, launched)
    rank = _rank()
    if os.environ.get(READY_ENV) == "1":
        run, resuming = RunDir(run_dir), os.environ.get(RESUMING_ENV) == "1"
    elif rank == 0:
        run, resuming = prepare_run_dir(spec, resolved, plan, run_dir, resume=resume, overwrite=overwrite,
                                        allow_spec_change=allow_spec_change)
    else:  # ranks > 0 under the user's own torchrun: rank 0 applies the rules
        run, resuming = RunDir(run_dir), bool(resume)
    log = Log(run.log if rank == 0 else None, enabled=rank == 0)
    log.capture_warnings()  # libraries' warnings to run.log only; close() ends it
    context = RunContext(spec=spec, registry=registry, run=run, log=log, resuming=resuming, plan=plan)
    if spec.parallelism.world_size > 1:
        context.parallel()  # every rank meets here before the first stage
        context.barrier()
    if spec.logging.tensorboard:
        log(f"TensorBoard: tensorboard --logdir {run.tb}")
    log(f"run {spec.name} (plan {plan['plan_hash']}) in {run.path}" + (" — resuming" if resuming else ""))
    started = time.time()
    summaries: dict[str, Any] = {}
    try:
        for stage in spec.stages:
            if run.stage_done(stage.name):
                log(f"[{stage.name}] already done; skipped")
                summaries[stage.name] = run.read_state()["stages"][stage.name].get("summary", {})
                continue
            if rank == 0:
                run.mark_stage(stage.name, "running")
            log(f"[{stage.name}] {stage.type} stage started")
            summary = registry.build("stage", stage, context=context) or {}
            summaries[stage.name] = summary
            context.stage_end(stage.name, summary)
            if rank == 0:
                run.mark_stage(stage.name, "done", summary=_jsonable(summary))
            context.barrier()
        _print_summary(log, spec, run, summaries, time.time() - started)
    finally:
        log.close()
    return summaries


def _jsonable(summary: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in summary.items() if isinstance(v, (int, float, str, bool, type(None)))}


def _print_summary(log: Log, spec: Spec, run: RunDir, summaries: dict[str, Any], seconds: float) -> None:
    lines = [f"done in {seconds:,.1f} s — {run.path}"]
    for name, s in summaries.items():
        bits = [f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in s.items()
                if k in ("steps", "final_loss", "val_loss", "val_ppl", "train_tokens", "val_tokens")]
        lines.append(f"  {name}: " + (", ".join(bits) or "done"))
    lines.append(f"  checkpoints: {run.path / 'checkpoints'}   metrics: {run.metrics}   logs: {run.log}")
    for line in lines:
        log(line)
