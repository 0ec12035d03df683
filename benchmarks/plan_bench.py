"""How long `llmforge plan` makes a user wait for the 7B spec, against `validate` of the same spec.

    python benchmarks/run.py --only plan_latency

`validate` is the floor `plan` stands on (the same imports and spec loading), so the
ratio shows what planning itself adds, which machine load barely moves.
"""

from __future__ import annotations

import os
import statistics
import sys
from pathlib import Path

from harness import compare, result, timed_run, wall_time

SPEC = "specs/7b-pretrain.yaml"
GOAL_S = 2.0


def _llmforge() -> list[str]:
    # The console script is what users run; fall back to the module if it is not installed.
    script = Path(sys.executable).with_name("llmforge")
    return [str(script)] if script.exists() else [sys.executable, "-m", "llmforge"]


def plan_latency(quick: bool) -> dict:
    """Median wall time of `llmforge plan specs/7b-pretrain.yaml` as a subprocess; goal < 2 s."""
    plan = [*_llmforge(), "plan", SPEC]
    validate = [*_llmforge(), "validate", SPEC, "--skip-inputs"]
    env = dict(os.environ)
    load = os.getloadavg()[0]
    wall_time(plan, env=env)  # warm the file cache and .pyc files once
    cpu: list[float] = []

    def run_plan() -> float:
        wall, cpu_s = timed_run(plan, env=env)
        cpu.append(cpu_s)
        return wall

    pairs = compare(lambda: wall_time(validate, env=env), run_plan, 4 if quick else 10)
    median = statistics.median(pairs.subject)
    return result(
        "plan_latency",
        round(median, 3),
        f"< {GOAL_S} s",
        median < GOAL_S,
        {
            "runs_s": [round(r, 3) for r in pairs.subject],
            "cpu_median_s": round(statistics.median(cpu), 3),
            "validate_median_s": round(statistics.median(pairs.baseline), 3),
            "plan_over_validate": round(pairs.ratio, 3),
            "load_average_1m": round(load, 2),
            "command": f"llmforge plan {SPEC}",
        },
        unit="s",
    )


if __name__ == "__main__":
    import json

    print(json.dumps(plan_latency("--quick" in sys.argv), indent=2))
