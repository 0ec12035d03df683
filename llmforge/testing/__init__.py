"""What a plugin's own test suite needs from llmforge, without llmforge's repository.

- `TINY_SPEC`: a spec shipped in the package (prepare, then 4 pretraining steps of a 2-layer
  model on generated sums; no input files): override what your component replaces.
- `validate_spec(overrides)`: the validated spec, as `llmforge validate` sees it (your
  installed plugin included); a bad spec raises `SpecError` with located `issues`.
- `run_spec(overrides, run_dir=..., max_steps=...)`: `llmforge run` in a fresh process, as a
  user runs it; returns the rows of metrics.jsonl, or raises `RunFailed` with its output.
- the `run_dir` fixture: a temporary run dir; make it yours with `from llmforge.testing import
  run_dir` in your `conftest.py` (or `pytest_plugins = ["llmforge.testing"]` in a root conftest).

Part of the plugin API v1 (docs/plugins.md), like `llmforge.plugin`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pytest

from llmforge.spec.errors import SpecError

TINY_SPEC = Path(__file__).resolve().parent / "tiny.yaml"

__all__ = ["TINY_SPEC", "RunFailed", "SpecError", "run_dir", "run_spec", "validate_spec"]


class RunFailed(AssertionError):
    """`llmforge run` exited non-zero; `returncode`, `stdout` and `stderr` say how."""

    def __init__(self, returncode: int, stdout: str, stderr: str):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr
        super().__init__(f"llmforge run exited {returncode}\n--- stdout (tail)\n{stdout[-3000:]}\n--- stderr (tail)\n{stderr[-3000:]}")


def validate_spec(overrides: Iterable[str] = (), spec: str | Path = TINY_SPEC, *, plugins: Iterable[tuple[Any, str, str]] = ()) -> Any:
    """The validated spec (`spec` with dotlist `overrides`), input files checked.

    Args:
        plugins: extra plugin objects as (object, provider, version), registered after the
            installed ones: a throwaway plugin defined in a test.
    """
    from llmforge.registry.manager import build_registry
    from llmforge.spec.load import load_spec
    from llmforge.spec.validate import validate_loaded

    registry = build_registry(list(plugins))
    return validate_loaded(load_spec(str(spec), list(overrides)), registry)


def _training_stages(spec: str | Path, overrides: list[str]) -> list[int]:
    from llmforge.spec.load import load_spec

    stages = load_spec(str(spec), overrides).data.get("stages") or []
    return [i for i, stage in enumerate(stages) if isinstance(stage, Mapping) and "train" in stage]


def run_spec(overrides: Iterable[str] = (), spec: str | Path = TINY_SPEC, *, run_dir: str | Path, max_steps: int | None = None,
             env: Mapping[str, str] | None = None, timeout: float = 600) -> list[dict[str, Any]]:
    """Run `spec` with `overrides` into `run_dir` (replaced if it exists) in a fresh process.

    Args:
        max_steps: cap every training stage at this many steps (`stages.<i>.train.max_steps`).
        env: extra environment variables for the run.

    Returns:
        The rows of metrics.jsonl: `kind: "train"` and `kind: "eval"` rows (docs/plugins.md).
    """
    overrides = list(overrides)
    if max_steps is not None:
        overrides += [f"stages.{i}.train.max_steps={max_steps}" for i in _training_stages(spec, overrides)]
    command = [sys.executable, "-m", "llmforge.cli", "run", str(spec), *overrides, "--run-dir", str(run_dir), "--overwrite"]
    environ = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    environ.setdefault("OMP_NUM_THREADS", "1")
    environ.setdefault("LLMFORGE_AUTO_LAYOUT", "0")  # the spec's own layout, whatever the machine's cores (docs/performance.md)
    proc = subprocess.run(command, capture_output=True, text=True, env=environ, timeout=timeout)
    if proc.returncode != 0:
        raise RunFailed(proc.returncode, proc.stdout, proc.stderr)
    metrics = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A run dir that does not exist yet, under pytest's tmp_path."""
    return tmp_path / "run"
