"""A run's life across attempts: finished stages that train on, later stages gone stale, why an attempt ended.

Megatron-LM users raise `--train-iters` and resume; here a finished stage whose budget
(`max_steps`, `max_tokens`, `max_epochs`) changed under `--allow-spec-change` runs again and
continues from its final checkpoint, and every later stage that reads its checkpoint
(`init_from`, `reference`, a reward model's `stage`) is marked stale and reruns. Each attempt
leaves a record of how it ended in `state.json`, which `llmforge status` and the Slurm
script read. Torch-free: the launcher and `status` use it.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from collections.abc import Callable
from typing import Any

from llmforge.runtime.rundir import RunDir
from llmforge.spec.errors import UserError

BUDGET_KEYS = ("max_steps", "max_tokens", "max_epochs")


def budget(stage) -> dict[str, Any] | None:
    """The stage's training budget as given in the spec, or None for a stage that does not train."""
    train = getattr(stage, "train", None)
    if train is None or not hasattr(train, "max_steps"):
        return None
    return {key: getattr(train, key, None) for key in BUDGET_KEYS}


def describe_budget(given: dict[str, Any] | None) -> str:
    """`max_steps 60`: the one budget key that is set."""
    if not given:
        return "no budget"
    return ", ".join(f"{key} {value:g}" if isinstance(value, float) else f"{key} {value}"
                     for key, value in given.items() if value is not None) or "no budget"


def budget_change(stage, entry: dict[str, Any]) -> str | None:
    """For a finished stage: `max_steps 60 -> max_steps 70` when its budget is not the one it finished, else None.

    A stage recorded before budgets were (llmforge before issue 33) is judged by its steps.
    """
    now = budget(stage)
    if now is None:
        return None
    recorded = entry.get("budget")
    if recorded is None:
        steps = (entry.get("summary") or {}).get("steps")
        if now["max_steps"] is None or steps is None or steps == now["max_steps"]:
            return None
        recorded = {"max_steps": steps, "max_tokens": None, "max_epochs": None}
    if {k: recorded.get(k) for k in BUDGET_KEYS} == now:
        return None
    return f"{describe_budget(recorded)} -> {describe_budget(now)}"


def refuse_shrunk_steps(spec, run: RunDir) -> None:
    """Refuse, before any work, a max_steps below the newest checkpoint of its stage (a token or epoch budget
    is counted in steps only by the stage's loader: `RunContext.run_loop` refuses those)."""
    from llmforge.runtime.checkpoint import CheckpointManager

    stages = run.read_state()["stages"]
    for index, stage in enumerate(spec.stages):
        given = budget(stage)
        if not given or given["max_steps"] is None or stages.get(stage.name, {}).get("status") == "stale":
            continue  # a stale stage's checkpoints are deleted when it reruns
        complete = CheckpointManager(run.checkpoints(stage.name), keep_last=1).complete()
        if complete and given["max_steps"] < complete[-1][0]:
            step, path = complete[-1]
            raise UserError(f"stage {stage.name!r}: max_steps {given['max_steps']} is below the {step} steps it has already trained ({path})",
                            f"a budget can grow, not shrink below where the stage is: give stages.{index}.train.max_steps={step} "
                            "or more, or train the stage afresh in a new run dir")


def readers_of(spec, name: str) -> list[tuple[Any, str]]:
    """Later stages that read `name`'s final checkpoint, directly or through another such stage, with the one each reads."""
    from llmforge.spec.checks import _stage_references

    changed, out = {name}, []
    for stage in spec.stages:
        reads = [ref for _, ref, _ in _stage_references(stage) if ref in changed]
        if reads and stage.name not in changed:
            changed.add(stage.name)
            out.append((stage, reads[0]))
    return out


def clear_stale(run: RunDir, stage_name: str, log: Callable[[str], None]) -> None:
    """Delete a stale stage's checkpoints, so that it starts afresh from its (new) source (rank 0)."""
    root = run.checkpoints(stage_name)
    if not root.exists():
        return
    count = sum(1 for p in root.iterdir() if p.name.startswith("step-"))
    # One rename makes them vanish for every reader at once; a kill during the deletion leaves only the trash.
    trash = root.with_name(f".tmp-stale-{stage_name}")
    shutil.rmtree(trash, ignore_errors=True)
    os.rename(root, trash)
    shutil.rmtree(trash, ignore_errors=True)
    log(f"[{stage_name}] stale: its {count} earlier checkpoint(s) deleted; it starts afresh")


def record_attempt(run: RunDir, command: list[str] | None) -> None:
    """Say in state.json that an attempt started (rank 0): who runs it, and the command that continues it."""
    attempt = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "command": command,
               "cwd": os.getcwd(), "slurm_job_id": os.environ.get("SLURM_JOB_ID")}
    run.update_state(attempt=attempt, exit=None)


def exit_reason(error: BaseException | None) -> tuple[str, int, str]:
    """(reason, exit code, one-line message) of an attempt that ended with `error` (None: finished)."""
    from llmforge.runtime.checkpoint import CheckpointWriteError
    from llmforge.runtime.train import EXIT_PREEMPTED, Preempted, TrainingStopped
    from llmforge.spec.errors import SpecError, UserError

    if error is None:
        return "finished", 0, ""
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if isinstance(error, Preempted):
        return "preempted", EXIT_PREEMPTED, message
    if isinstance(error, (TrainingStopped, CheckpointWriteError)):
        return "stopped", 1, message
    if isinstance(error, (UserError, SpecError)):
        return "refused", 2, message
    if isinstance(error, KeyboardInterrupt):
        return "interrupted", 130, "interrupted (Ctrl-C)"
    return "failed", 1, f"{type(error).__name__}: {message}"


def record_exit(run: RunDir, error: BaseException | None, stage: str | None) -> None:
    """Say in state.json how this attempt ended (rank 0). Best effort: a full disk must not hide the real error."""
    reason, code, message = exit_reason(error)
    try:
        run.update_state(exit={"reason": reason, "code": code, "message": message, "stage": stage, "at": time.time()})
    except OSError:
        pass

