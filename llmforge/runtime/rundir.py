"""The run directory: what a run leaves behind, and the rules that keep it trustworthy.

A used run dir is refused unless the user says `--resume` (continue) or `--overwrite`
(their explicit choice to delete it). A lock file stops two live runs from sharing it,
and a changed spec on resume is refused with a field-by-field diff.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
from pathlib import Path
from typing import Any

from llmforge.atomic import atomic_write_text
from llmforge.spec.errors import UserError

STATE_FILE = "state.json"
STATE_VERSION = 1


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(data, list):
        out = {}
        for i, v in enumerate(data):
            out.update(_flatten(v, f"{prefix}[{i}]"))
        return out or {prefix: []}
    return {prefix: data}


def spec_diff(old: dict, new: dict) -> list[str]:
    """Field-by-field differences between two resolved specs, as `path: old -> new` lines."""
    a, b = _flatten(old), _flatten(new)
    lines = []
    for key in sorted(set(a) | set(b)):
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            lines.append(f"{key}: {a.get(key, '<absent>')!r} -> {b.get(key, '<absent>')!r}")
    return lines


class RunDir:
    """Paths and state of one run directory."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._lock_fd: int | None = None

    # --- paths ---------------------------------------------------------------------------
    @property
    def tokenizer(self) -> Path:
        return self.path / "tokenizer"

    @property
    def data(self) -> Path:
        return self.path / "data"

    @property
    def tb(self) -> Path:
        return self.path / "tb"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def log(self) -> Path:
        return self.path / "run.log"

    def checkpoints(self, stage: str) -> Path:
        return self.path / "checkpoints" / stage

    # --- lifecycle -----------------------------------------------------------------------
    def is_used(self) -> bool:
        return self.path.exists() and any(self.path.iterdir())

    def prepare(self, resolved_spec: dict, *, resume: bool, overwrite: bool, allow_spec_change: bool) -> bool:
        """Create, reuse or refuse the directory; returns True when resuming an earlier run."""
        if overwrite and resume:
            raise UserError("--resume and --overwrite contradict each other", "pick one: --resume continues, --overwrite deletes and starts over")
        if self.is_used() and not (self.path / "spec.resolved.yaml").exists() and not overwrite:
            raise UserError(f"run dir {self.path} is not empty and holds no llmforge run", "choose another --run-dir, or pass --overwrite to delete it")
        if self.is_used() and overwrite:
            self.lock()  # never delete under a live run
            self.unlock()
            shutil.rmtree(self.path)
        if self.is_used():
            if not resume:
                raise UserError(
                    f"run dir {self.path} is already used by an earlier run",
                    "pass --resume to continue it, --overwrite to delete it and start over, or --run-dir for a new one",
                )
            old = self.read_resolved_spec()
            diff = spec_diff(old, resolved_spec)
            if diff and not allow_spec_change:
                shown = "\n    ".join(diff[:40])
                raise UserError(
                    f"the spec changed since this run started ({len(diff)} field(s)):\n    {shown}",
                    "resume with the original spec, or pass --allow-spec-change if the change is intended",
                )
            self.lock()
            return True
        if resume:
            raise UserError(f"nothing to resume: {self.path} holds no run", "drop --resume to start a new run")
        self.path.mkdir(parents=True, exist_ok=True)
        self.lock()
        return False

    def lock(self) -> None:
        """Hold an exclusive lock for the life of this process (released by the OS on a kill)."""
        import fcntl

        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            owner = (self.path / ".lock").read_text(errors="replace").strip() or "another process"
            raise UserError(f"run dir {self.path} is in use by a live run ({owner})", "wait for it to finish, or use another --run-dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # --- records -------------------------------------------------------------------------
    def read_resolved_spec(self) -> dict:
        import yaml

        return yaml.safe_load((self.path / "spec.resolved.yaml").read_text()) or {}

    def write_records(self, resolved_spec: dict, plan: dict, env: dict) -> None:
        import yaml

        atomic_write_text(self.path / "spec.resolved.yaml", yaml.safe_dump(resolved_spec, sort_keys=False))
        atomic_write_text(self.path / "plan.json", json.dumps(plan, indent=2) + "\n")
        atomic_write_text(self.path / "env.json", json.dumps(env, indent=2) + "\n")

    def read_state(self) -> dict:
        path = self.path / STATE_FILE
        if not path.exists():
            return {"version": STATE_VERSION, "stages": {}}
        state = json.loads(path.read_text())
        if state.get("version") != STATE_VERSION:
            raise UserError(f"{path} has state version {state.get('version')}, this llmforge reads {STATE_VERSION}", "resume with the llmforge that started the run")
        return state

    def mark_stage(self, stage: str, status: str, **extra: Any) -> None:
        state = self.read_state()
        state["stages"][stage] = {"status": status, **extra}
        atomic_write_text(self.path / STATE_FILE, json.dumps(state, indent=2) + "\n")

    def stage_done(self, stage: str) -> bool:
        return self.read_state()["stages"].get(stage, {}).get("status") == "done"

    def update_state(self, **records: Any) -> None:
        """Set (or, with None, drop) top-level records of state.json beside the stages: `attempt`, `exit`."""
        state = self.read_state()
        for key, value in records.items():
            if value is None:
                state.pop(key, None)
            else:
                state[key] = value
        atomic_write_text(self.path / STATE_FILE, json.dumps(state, indent=2) + "\n")


def environment_record(layout: dict) -> dict:
    """What produced the run: versions, git SHA, host, layout and command line."""
    import platform
    import subprocess
    from importlib.metadata import PackageNotFoundError, version

    from llmforge import __version__

    def ver(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    sha = None
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    return {
        "llmforge": __version__,
        "torch": ver("torch"),
        "megatron-core": ver("megatron-core"),
        "python": platform.python_version(),
        "git_sha": sha,
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "layout": layout,
        "command": sys.argv,
    }
