"""How long `llmforge validate` makes a user wait, and how much of it is imports.

    python benchmarks/run.py --only validate_latency
"""

from __future__ import annotations

import os
import re
import statistics
import sys
import time
from pathlib import Path

from harness import ROOT, result, timed_run, wall_time

SPEC = "specs/7b-pretrain.yaml"
GOAL_S = 0.5


def _llmforge() -> list[str]:
    # The console script is what users run; fall back to the module if it is not installed.
    script = Path(sys.executable).with_name("llmforge")
    return [str(script)] if script.exists() else [sys.executable, "-m", "llmforge"]


def _import_profile(args: list[str]) -> tuple[float, float, list[tuple[str, float]], set[str]]:
    """(wall s, import s, the slowest top-level imports, every module imported) of one run under -X importtime."""
    import subprocess

    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "llmforge", *args], cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"validate exited {proc.returncode}: {proc.stderr.strip()[-500:]}")
    total_us, top, modules = 0, [], set()
    for line in proc.stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \| (\s*)(\S+)", line)
        if not m:
            continue
        self_us, cumulative_us, indent, name = int(m[1]), int(m[2]), m[3], m[4]
        total_us += self_us
        modules.add(name)
        if indent == "":
            top.append((name, cumulative_us / 1e6))
    top.sort(key=lambda item: -item[1])
    return wall, total_us / 1e6, top[:6], modules


def validate_latency(quick: bool) -> dict:
    """Median wall time of `llmforge validate specs/7b-pretrain.yaml --skip-inputs` as a subprocess."""
    args = ["validate", SPEC, "--skip-inputs"]
    argv = [*_llmforge(), *args]
    env = dict(os.environ)
    load = os.getloadavg()[0]
    wall_time(argv, env=env)  # warm the file cache and .pyc files once
    timed = [timed_run(argv, env=env) for _ in range(5 if quick else 15)]
    runs = [wall for wall, _ in timed]
    median = statistics.median(runs)
    profiled_wall, import_s, top, modules = _import_profile(args)
    heavy = sorted(m for m in modules if m.split(".")[0] in ("torch", "megatron", "transformer_engine"))
    return result(
        "validate_latency",
        round(median, 3),
        f"< {GOAL_S} s",
        median < GOAL_S and not heavy,
        {
            "runs_s": [round(r, 3) for r in runs],
            "cpu_median_s": round(statistics.median(cpu for _, cpu in timed), 3),
            "load_average_1m": round(load, 2),
            "command": " ".join(["llmforge", *args]),
            "import_s": round(import_s, 3),
            "import_share": round(import_s / profiled_wall, 3),
            "slowest_imports_s": {name: round(s, 3) for name, s in top},
            "heavy_imports": heavy,
        },
        unit="s",
    )
