"""Helpers shared by the benchmark modules (`*_bench.py`); `run.py` collects and runs them.

A benchmark is a function `fn(quick: bool) -> dict | list[dict]`; each dict has `name`,
`figure`, `goal`, `met`, `details` and optionally `unit`. Use `result()` to build one.
"""

from __future__ import annotations

import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def result(name: str, figure: float, goal: float | str, met: bool, details: dict[str, Any] | None = None, unit: str = "") -> dict[str, Any]:
    return {"name": name, "figure": figure, "goal": goal, "met": bool(met), "unit": unit, "details": details or {}}


def timed_run(argv: Sequence[str], *, env: dict[str, str] | None = None, cwd: Path = ROOT, check: bool = True) -> tuple[float, float]:
    """(wall, cpu) seconds of one subprocess from spawn to exit.

    Wall time is what a user waits; CPU time (user + sys) barely moves when other jobs load
    the machine, so it tells a slow command from a busy machine.
    """
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(list(argv), cwd=cwd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip()[-500:]}")
    return elapsed, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def wall_time(argv: Sequence[str], *, env: dict[str, str] | None = None, cwd: Path = ROOT, check: bool = True) -> float:
    """Seconds one subprocess takes from spawn to exit (what a user waits)."""
    return timed_run(argv, env=env, cwd=cwd, check=check)[0]


@dataclass
class Comparison:
    """Alternating runs of a baseline and a subject; `ratio` is the median of subject / baseline per pair."""

    baseline: list[float] = field(default_factory=list)
    subject: list[float] = field(default_factory=list)

    @property
    def ratios(self) -> list[float]:
        return [s / b for b, s in zip(self.baseline, self.subject)]

    @property
    def ratio(self) -> float:
        return statistics.median(self.ratios)

    def details(self) -> dict[str, Any]:
        return {
            "baseline_median": statistics.median(self.baseline),
            "subject_median": statistics.median(self.subject),
            "ratio_median": self.ratio,
            "ratios": [round(r, 4) for r in self.ratios],
        }


def compare(baseline: Callable[[], float], subject: Callable[[], float], repeats: int) -> Comparison:
    """Measure baseline and subject alternately, so that drift in machine load hits both alike.

    Each callable returns one measurement (seconds, tokens/s...). Pair i is run baseline
    first on even i and subject first on odd i, to cancel any first-runner advantage.
    """
    out = Comparison()
    for i in range(repeats):
        if i % 2 == 0:
            out.baseline.append(baseline())
            out.subject.append(subject())
        else:
            out.subject.append(subject())
            out.baseline.append(baseline())
    return out


def machine() -> dict[str, Any]:
    """What the figures were measured on; torch's version is read without importing it."""
    from importlib.metadata import PackageNotFoundError, version

    from llmforge.runtime.device import cpu_name

    cpu = cpu_name()
    try:
        torch_version = version("torch")
    except PackageNotFoundError:
        torch_version = None
    return {
        "load_average_1m": round(os.getloadavg()[0], 2),  # other jobs on the machine skew wall times
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch": torch_version,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "executable": sys.executable,
    }
