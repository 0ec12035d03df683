"""`llmforge status RUN_DIR`: where a run stands, from what it leaves in its run dir. Torch-free.

Read, never written: `state.json` (stages, the last attempt and how it ended), the lock
(a live process holds it while a run lives), `metrics.jsonl` (read from its end), the
stages' newest complete checkpoints, and `spec.resolved.yaml`.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llmforge.runtime.rundir import RunDir
from llmforge.spec.errors import UserError

# Train-row keys the console shows; --json gives every key.
SHOWN_TRAIN = ("loss", "lr", "grad_norm", "tokens_per_s")
_ROW_KEYS = ("kind", "stage", "step", "tokens")
_BLOCK = 1 << 20


def _rows_backwards(path: Path) -> Iterator[dict]:
    """metrics.jsonl's rows from the last: a long run's file is read only as far back as needed."""
    if not path.exists():
        return
    with open(path, "rb") as f:
        end = f.seek(0, os.SEEK_END)
        tail = b""
        while end > 0:
            start = max(0, end - _BLOCK)
            f.seek(start)
            lines = (f.read(end - start) + tail).split(b"\n")
            end, tail = start, lines[0]
            for line in reversed(lines[1:] if start > 0 else lines):
                try:
                    yield json.loads(line)
                except ValueError:  # an empty line, or a torn last one from a kill
                    continue


def _last_rows(path: Path, wanted: dict[str, set[str]]) -> dict[str, dict[str, dict]]:
    """{stage: {kind: its last row}} for the kinds wanted of each stage ("train", "eval"), as far as the file has them."""
    found: dict[str, dict[str, dict]] = {name: {} for name in wanted}
    for row in _rows_backwards(path):
        kinds = wanted.get(row.get("stage"), ())
        if row.get("kind") in kinds:
            found[row["stage"]].setdefault(row["kind"], row)
            if all(len(found[name]) == len(kinds) for name, kinds in wanted.items()):
                break
    return found


def probe_lock(run: RunDir) -> dict[str, Any]:
    """Whether a live process holds the run dir's lock, and who took it last (`pid N on HOST`).

    A shared, non-blocking flock fails while a run holds its exclusive one; it is let go at once.
    """
    import fcntl

    path = run.path / ".lock"
    if not path.exists():
        return {"held": False, "owner": None, "pid": None, "host": None, "alive": None}
    owner = path.read_text(errors="replace").strip() or None
    pid = host = None
    if owner and owner.startswith("pid ") and " on " in owner:
        number, host = owner[4:].split(" on ", 1)
        pid = int(number) if number.isdigit() else None
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        held = False
        fcntl.flock(fd, fcntl.LOCK_UN)
    except BlockingIOError:
        held = True
    finally:
        os.close(fd)
    alive = None
    if pid is not None and host == socket.gethostname():
        try:
            os.kill(pid, 0)
            alive = True
        except ProcessLookupError:
            alive = False
        except PermissionError:  # someone else's process
            alive = True
    return {"held": held, "owner": owner, "pid": pid, "host": host, "alive": alive}


def _newest_checkpoint(run: RunDir, stage: str, now: float) -> dict[str, Any] | None:
    """The stage's newest checkpoint with a COMPLETE marker (checksums are checked on resume, not here)."""
    from llmforge.runtime.checkpoint import MARKER, CheckpointManager

    complete = CheckpointManager(run.checkpoints(stage), keep_last=1).complete()
    if not complete:
        return None
    step, path = complete[-1]
    try:
        trainer = json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError):
        trainer = {}
    written = (path / MARKER).stat().st_mtime
    return {"path": str(path), "step": step, "age_s": max(0.0, now - written), "total": trainer.get("total"),
            "tokens": trainer.get("tokens")}


def _attempt(state: dict, lock: dict) -> dict[str, Any] | None:
    """The last attempt: how it ended (its record), or `running` / `killed` (no record: a live or a dead process)."""
    attempt, ended = state.get("attempt"), state.get("exit")
    if attempt is None and ended is None:
        return None  # a run dir of llmforge before these records
    out = {**(attempt or {}), "reason": None, "code": None, "message": "", "stage": None, "ended": None}
    if ended is not None:
        out.update(reason=ended["reason"], code=ended["code"], message=ended.get("message", ""), stage=ended.get("stage"),
                   ended=ended.get("at"))
    elif lock["held"]:
        out["reason"] = "running"
    else:
        out.update(reason="killed", message="no exit record: the process was killed (SIGKILL, out of memory, a lost node) "
                                            "or ended outside a training loop")
    return out


def _continue_command(run: RunDir, attempt: dict | None) -> str:
    command = (attempt or {}).get("command")
    if not command:  # the spec path was not recorded: the user knows it
        return f"llmforge run SPEC --run-dir {shlex.quote(str(run.path))} --resume"
    words = [w for w in command if w not in ("--resume", "--resume-or-start", "--overwrite", "--allow-spec-change")]
    return shlex.join(["llmforge", *words, "--run-dir", str(run.path.resolve()), "--resume"])


def run_status(run_dir: str | os.PathLike) -> dict[str, Any]:
    """Everything `llmforge status` says about a run dir, as a JSON-ready dict."""
    run = RunDir(run_dir)
    if not (run.path / "spec.resolved.yaml").exists():
        raise UserError(f"{run.path} holds no llmforge run (no spec.resolved.yaml)", "give the run dir of a `llmforge run`")
    now = time.time()
    spec = run.read_resolved_spec()
    state = run.read_state()
    lock = probe_lock(run)
    attempt = _attempt(state, lock)
    specs = [s for s in spec.get("stages") or [] if isinstance(s, dict)]
    # The stages that ran and train; the reading stops when each has its last train and eval row.
    rows = _last_rows(run.metrics, {s.get("name"): {"train", "eval"} for s in specs if s.get("train") and s.get("name") in state["stages"]})
    stages = []
    for s in specs:
        name = s.get("name")
        entry = state["stages"].get(name, {})
        status = entry.get("status")
        ckpt = _newest_checkpoint(run, name, now)
        train, evaluation = rows.get(name, {}).get("train"), rows.get(name, {}).get("eval")
        budget = s.get("train") or {}
        summary = entry.get("summary") or {}
        steps = [v for v in ((train or {}).get("step"), (ckpt or {}).get("step")) if v is not None]
        total = ((ckpt or {}).get("total") or budget.get("max_steps") or (summary.get("steps") if status == "done" else None))
        stages.append({
            "name": name, "type": s.get("type"),
            "state": {"done": "done", "stale": "stale", None: "not started"}.get(status, "running" if lock["held"] else "stopped"),
            "pid": lock["pid"] if status == "running" and lock["held"] else None,
            "stale_because": entry.get("because") if status == "stale" else None,
            "step": max(steps) if steps else (summary.get("steps") if status == "done" else None),
            "total": total,
            "tokens": (train or {}).get("tokens", (ckpt or {}).get("tokens")),
            "train": train, "eval": evaluation, "checkpoint": ckpt,
        })
    all_done = bool(stages) and all(s["state"] == "done" for s in stages)
    if lock["held"]:
        next_ = "running"
    elif all_done:
        next_ = "done"
    elif attempt is not None and attempt["reason"] in ("stopped", "failed", "refused"):
        next_ = "fix"
    else:
        next_ = "resume"
    return {
        "run_dir": str(run.path), "name": spec.get("name"), "stages": stages, "lock": lock, "last_attempt": attempt, "next": next_,
        # One word per stage that changes whenever the run moves on (a new checkpoint, a finished stage): scripts compare it.
        "progress": " ".join(f"{s['name']}={'done' if s['state'] == 'done' else (s['checkpoint'] or {}).get('step', '-')}"
                             for s in stages),
        "continue": None if next_ in ("running", "done") else _continue_command(run, attempt),
    }


def field_text(status: dict[str, Any], name: str) -> str:
    """One top-level field of the status as a line, for scripts (`--field next`, `--field progress`)."""
    if name not in status:
        raise UserError(f"the status has no field {name!r}", f"pick one of: {', '.join(status)}")
    value = status[name]
    return "" if value is None else value if isinstance(value, str) else json.dumps(value)


def _age(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 36 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def _number(value: Any) -> str:
    if isinstance(value, float):
        if value and abs(value) < 1e-2:
            return f"{value:.3e}"
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.4f}"
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)


def render(status: dict[str, Any]) -> list[str]:
    """The console view of `run_status`."""
    now = time.time()
    attempt, lock = status["last_attempt"], status["lock"]
    if attempt is None:
        head = "last attempt: unknown (no record: a run of an older llmforge)"
    else:
        reason = attempt["reason"] + (f" (exit {attempt['code']})" if attempt.get("code") not in (None, 0) else "")
        when = f", {_age(now - attempt['ended'])} ago" if attempt.get("ended") else ""
        head = f"last attempt: {reason}{when}" + (f": {attempt['message']}" if attempt.get("message") else "")
    lines = [f"run {status['name']} in {status['run_dir']}", f"  {head}"]
    width = max((len(s["name"]) for s in status["stages"]), default=0)
    for s in status["stages"]:
        state = s["state"] + (f" (pid {s['pid']})" if s["pid"] else "")
        if s["stale_because"]:
            state += f": reruns, {s['stale_because']} trained on"
        bits = [f"  {s['name']:<{width}}  {state}"]
        if s["step"] is not None:
            bits.append(f"step {s['step']:,}/{s['total']:,}" if s["total"] else f"step {s['step']:,}")
        if s["tokens"] is not None:
            bits.append(f"tokens {s['tokens']:,}")
        lines.append("  ".join(bits))
        if s["train"]:
            shown = ", ".join(f"{k} {_number(s['train'][k])}" for k in SHOWN_TRAIN if s["train"].get(k) is not None)
            lines.append(f"  {'':<{width}}  train @ {s['train']['step']}: {shown}")
        if s["eval"]:
            values = [(k, v) for k, v in s["eval"].items() if k not in _ROW_KEYS and isinstance(v, (int, float)) and not isinstance(v, bool)]
            lines.append(f"  {'':<{width}}  eval @ {s['eval']['step']}: " + ", ".join(f"{k} {_number(v)}" for k, v in values[:6]))
        if s["checkpoint"]:
            c = s["checkpoint"]
            lines.append(f"  {'':<{width}}  checkpoint {c['path']} ({_age(c['age_s'])} old)")
    if lock["held"]:
        lines.append(f"  lock: held by a live process ({lock['owner']})")
    else:
        gone = {True: ", still alive but not holding it", False: ", gone"}.get(lock["alive"], "")
        lines.append("  lock: free" + (f" (last taken by {lock['owner']}{gone})" if lock["owner"] else ""))
    if status["next"] == "running":
        pid = lock["pid"]
        lines.append(f"  running: `kill -TERM {pid}` stops it with a final checkpoint (exit 75)" if pid else "  running")
    elif status["next"] == "done":
        lines.append("  every stage is done; to train one longer, raise its budget and resume with --allow-spec-change")
    elif status["next"] == "fix":
        lines.append(f"  continue, once the cause is fixed: {status['continue']}")
    else:
        lines.append(f"  continue: {status['continue']}")
    return lines
