"""`memory`: peak RSS above the post-import baseline for a specs/tiny.yaml training step, llmforge against the reference.

    python benchmarks/run.py --only memory [--quick]

Each side runs in its own process (`python benchmarks/memory_bench.py --worker SIDE`): it
imports what it needs (torch; for llmforge also megatron and its runtime), reads its RSS
as the baseline, builds model and optimizer, trains a few bf16 steps of the tiny spec's
batch (as the spec trains: megatron's bf16 for llmforge, autocast for the reference), and
reports the high-water mark (VmHWM) above that baseline.
Processes alternate, reference first in even pairs; the figure is the median ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from harness import ROOT, compare, result

GOAL = 1.1
SIDES = ("llmforge", "reference")


def _worker(side: str, steps: int) -> dict:
    import torch  # noqa: F401  (both sides' baseline includes torch)

    import workloads

    after_torch = workloads.rss_mb()
    if side == "llmforge":
        import megatron.core.models.gpt.gpt_model  # noqa: F401
        import llmforge.runtime.step  # noqa: F401
    work = workloads.tiny_workload()
    baseline = workloads.rss_mb()
    built = workloads.build_llmforge(work, precisions=("bf16",)) if side == "llmforge" else workloads.build_reference(work)
    data = workloads.batches(work)
    for _ in range(steps):
        built["step"]["bf16"](data)
    peak = workloads.peak_rss_mb()
    # The baseline is taken after llmforge's imports (megatron included); what those imports cost is reported too.
    return {"side": side, "baseline_mb": round(baseline, 1), "peak_above_baseline_mb": round(peak - baseline, 1),
            "import_mb": round(baseline - after_torch, 1), "peak_above_torch_mb": round(peak - after_torch, 1), "steps": steps}


def _measure(side: str, steps: int, runs: list[dict]) -> float:
    argv = [sys.executable, str(Path(__file__).resolve()), "--worker", side, "--steps", str(steps)]
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"memory worker {side} exited {proc.returncode}: {proc.stderr.strip()[-800:]}")
    runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return runs[-1]["peak_above_baseline_mb"]


def memory(quick: bool) -> dict:
    """Median llmforge / reference peak RSS above baseline, each side in a fresh process."""
    steps = 1 if quick else 3
    runs: list[dict] = []
    pair = compare(lambda: _measure("reference", steps, runs), lambda: _measure("llmforge", steps, runs), 1 if quick else 2)
    return result("memory", round(pair.ratio, 3), f"<= {GOAL}", pair.ratio <= GOAL, unit="x", details={
        "llmforge_peak_above_baseline_mb": statistics.median(pair.subject),
        "reference_peak_above_baseline_mb": statistics.median(pair.baseline),
        "ratios": [round(r, 3) for r in pair.ratios],
        "baseline_mb": {side: statistics.median(r["baseline_mb"] for r in runs if r["side"] == side) for side in SIDES},
        "imports_above_torch_mb": {side: statistics.median(r["import_mb"] for r in runs if r["side"] == side) for side in SIDES},
        "ratio_with_imports": round(statistics.median(r["peak_above_torch_mb"] for r in runs if r["side"] == "llmforge")
                                    / statistics.median(r["peak_above_torch_mb"] for r in runs if r["side"] == "reference"), 3),
        "workload": "specs/tiny.yaml model in bf16 as the spec trains (llmforge: megatron's bf16 parameters with fp32 master weights; "
                    "the reference: bf16 autocast over fp32 weights), 2 micro batches of 8 × 256 tokens, AdamW",
        "steps": steps,
        "threads": os.environ.get("OMP_NUM_THREADS") or "all cores",
    })


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="one side's peak RSS (a worker of the memory benchmark)")
    parser.add_argument("--worker", choices=SIDES, required=True)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    import warnings

    warnings.filterwarnings("ignore")  # megatron's "Apex is not installed" notices
    print(json.dumps(_worker(args.worker, args.steps)))
