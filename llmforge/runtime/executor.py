"""Run the plan's stages in order; each hands its outputs to the next through the run dir.

A finished stage is not rerun on `--resume`, unless its budget changed (`--allow-spec-change`):
then it trains on from its final checkpoint and the later stages that read it rerun
(runtime/lifecycle.py). The stage that was running resumes from its newest complete checkpoint.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from llmforge.registry.components import Registry
from llmforge.runtime import gc_policy, lifecycle
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
    if resuming:
        lifecycle.refuse_shrunk_steps(spec, run)
    layout = spec.parallelism.model_dump()
    if not resuming or allow_spec_change:
        run.write_records(resolved, plan, environment_record(layout))
    return run, resuming


def execute(spec: Spec, resolved: dict, plan: dict, registry: Registry, *, run_dir: Path, resume: bool | None,
            overwrite: bool, allow_spec_change: bool, command: list[str] | None = None) -> dict[str, Any]:
    """Run the stages; `command` (the CLI words, spec path absolute) is recorded as the way to continue."""
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
    if note := os.environ.get("LLMFORGE_AUTO_LAYOUT_NOTE"):  # the layout `llmforge run` chose (runtime.cpu_layout)
        log(note)
    context = RunContext(spec=spec, registry=registry, run=run, log=log, resuming=resuming, plan=plan)
    if spec.parallelism.world_size > 1:
        context.parallel()  # every rank meets here before the first stage
        context.barrier()
    if spec.logging.tensorboard:
        log(f"TensorBoard: tensorboard --logdir {run.tb}")
    log(f"run {spec.name} (plan {plan['plan_hash']}) in {run.path}" + (" — resuming" if resuming else ""))
    started = time.time()
    summaries: dict[str, Any] = {}
    if rank == 0:
        lifecycle.record_attempt(run, command)
    current: str | None = None
    try:
        for stage in spec.stages:
            current = stage.name
            summary = _run_stage(stage, spec, run, context, registry, log, rank)
            summaries[stage.name] = summary
        _print_summary(log, spec, run, summaries, time.time() - started)
    except BaseException as e:
        if rank == 0:
            lifecycle.record_exit(run, e, current)
        raise
    else:
        if rank == 0:
            lifecycle.record_exit(run, None, None)
    finally:
        log.close()
    return summaries


def _run_stage(stage, spec: Spec, run: RunDir, context, registry: Registry, log: Log, rank: int) -> dict[str, Any]:
    """Skip a finished stage, or run (resume, extend, rerun) it; returns its summary."""
    entry = run.read_state()["stages"].get(stage.name, {})
    status = entry.get("status")
    change = lifecycle.budget_change(stage, entry) if status == "done" else None
    if status == "done" and change is None:
        log(f"[{stage.name}] already done; skipped")
        return entry.get("summary", {})
    # A stage extended in an earlier attempt keeps the step it had finished at, until it finishes again.
    extends_from = entry.get("extends_from")
    if change is not None:
        extends_from = (entry.get("summary") or {}).get("steps")
        log(f"[{stage.name}] budget changed ({change}): it trains on from its final checkpoint")
    if status == "stale":
        if rank == 0:
            lifecycle.clear_stale(run, stage.name, log)
        context.barrier()
    if rank == 0:
        run.mark_stage(stage.name, "running", **({"extends_from": extends_from} if extends_from is not None else {}))
    log(f"[{stage.name}] {stage.type} stage started")
    gc_policy.stage_starting(stage.type)
    summary = registry.build("stage", stage, context=context) or {}
    if extends_from is not None and summary.get("steps") == extends_from:
        log(f"[{stage.name}] its new budget gives the {extends_from} steps it had trained: nothing more to train")
        summary = {**entry.get("summary", {}), **{k: v for k, v in summary.items() if k == "steps"}}
    context.stage_end(stage.name, summary)
    if rank == 0:
        if extends_from is not None and summary.get("steps") != extends_from:
            _mark_readers_stale(spec, run, stage.name, f"step {extends_from} to step {summary.get('steps')}", log)
        given = lifecycle.budget(stage)
        run.mark_stage(stage.name, "done", summary=_jsonable(summary), **({"budget": given} if given else {}))
    context.barrier()
    return summary


def _mark_readers_stale(spec: Spec, run: RunDir, name: str, moved: str, log: Log) -> None:
    """Later stages that read `name`'s final checkpoint (which moved) rerun: marked stale in state.json, one line each."""
    stages = run.read_state()["stages"]
    for later, source in lifecycle.readers_of(spec, name):
        if later.name in stages:  # one that never started has nothing stale
            run.mark_stage(later.name, "stale", because=source)
            why = f"{source}'s final checkpoint moved from {moved}" if source == name else f"{source}, which it starts from, reruns"
            log(f"[{later.name}] stale: {why}; it reruns")


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
