"""`train_step`: tokens/s of llmforge's training step against a plain-PyTorch GPT of the same shape.

    python benchmarks/run.py --only train_step [--quick]

Each shape runs in a fresh worker process (`python benchmarks/train_bench.py --worker
SHAPE`), so that import and build times and the peak RSS are its own. In the worker
both sides train on the same batch in fp32, in bf16 autocast over fp32 weights, and
llmforge in megatron's bf16 (bf16 weights, fp32 master weights) against the reference's
autocast, nanoGPT's bf16 recipe; measurements alternate reference and llmforge
(harness.compare), and the figure is the median of llmforge / reference tokens/s per
pair, for the worst of the six shape × precision cases. Megatron's bf16 is also
alternated against llmforge's autocast and fp32 steps (`bf16_over`), next to the ratio of
this CPU's bf16 and fp32 2048² matmul peaks, measured in the same worker; MFU is against
the peak of the dtype that computes. Each measurement is the fastest of a few steps (load
from other jobs only ever slows a step down); CPU seconds are reported too.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from harness import ROOT, compare, result

GOAL = 1.0
SHAPES = ("tiny", "10m")
PRECISIONS = ("fp32", "bf16-autocast", "bf16")


def _worker(shape: str, *, steps: int, pairs: int, quick: bool) -> dict:
    """Everything measured for one shape, in this (fresh) process."""
    start = time.perf_counter()
    import torch

    torch_import_s = time.perf_counter() - start
    import workloads
    from llmforge.models.size import flops_per_token, param_count
    from llmforge.plan.cost import model_flops_utilization

    work = workloads.workload(shape)
    if quick:
        work = work.shrunk(micro_batch_size=2, num_micro_batches=2)
    # What a user waits for before the first step: megatron and llmforge's runtime, then the build.
    start = time.perf_counter()
    import megatron.core.models.gpt.gpt_model  # noqa: F401
    import llmforge.runtime.step  # noqa: F401
    import llmforge.runtime.optim  # noqa: F401

    llmforge_import_s = time.perf_counter() - start
    baseline_rss = workloads.rss_mb()
    start = time.perf_counter()
    ours = workloads.build_llmforge(work)
    llmforge_build_s = time.perf_counter() - start
    data = workloads.batches(work)
    for precision in PRECISIONS:  # first steps allocate buffers and warm the thread pool
        ours["step"][precision](data)
    llmforge_peak_rss = workloads.peak_rss_mb() - baseline_rss

    start = time.perf_counter()
    theirs = workloads.build_reference(work)
    reference_build_s = time.perf_counter() - start
    for precision in PRECISIONS:
        theirs["step"][precision](data)

    peak = {dtype: workloads.matmul_peak_flops(dtype) for dtype in ("fp32", "bf16")}
    peak_of = lambda precision: peak["fp32" if precision == "fp32" else "bf16"]  # noqa: E731
    options = work.options()
    flops = flops_per_token(options, work.seq_length)

    def rate(cpu: list[float], step_fn) -> float:
        # The fastest of `steps` steps: other jobs on a shared machine only ever slow a step down.
        best_wall, best_cpu = min(workloads.timed(lambda: step_fn(data)) for _ in range(steps))
        cpu.append(best_cpu)
        return work.tokens_per_step / best_wall

    cases = {}
    for precision in PRECISIONS:
        cpu: dict[str, list[float]] = {"llmforge": [], "reference": []}
        pair = compare(lambda: rate(cpu["reference"], theirs["step"][precision]), lambda: rate(cpu["llmforge"], ours["step"][precision]), pairs)
        tokens_per_s = statistics.median(pair.subject)
        cases[precision] = {
            "ratio": round(pair.ratio, 3),
            "llmforge_tokens_per_s": round(tokens_per_s),
            "reference_tokens_per_s": round(statistics.median(pair.baseline)),
            "reference_runs": workloads.REFERENCE_PRECISION[precision],
            "ratios": [round(r, 3) for r in pair.ratios],
            "cpu_ratio": round(statistics.median(r / o for r, o in zip(cpu["reference"], cpu["llmforge"])), 3),
            "mfu": round(model_flops_utilization(tokens_per_s, flops, world_size=1, peak_flops=peak_of(precision)), 4),
            "reference_mfu": round(model_flops_utilization(statistics.median(pair.baseline), flops, world_size=1,
                                                           peak_flops=peak_of(precision)), 4),
        }
    # Megatron's bf16 against llmforge's own autocast and fp32 steps, alternating as well.
    bf16_over = {}
    for baseline in ("bf16-autocast", "fp32"):
        cpu = {"baseline": [], "bf16": []}
        pair = compare(lambda: rate(cpu["baseline"], ours["step"][baseline]), lambda: rate(cpu["bf16"], ours["step"]["bf16"]), pairs)
        bf16_over[baseline] = {"ratio": round(pair.ratio, 3), "ratios": [round(r, 3) for r in pair.ratios],
                               "tokens_per_s": round(statistics.median(pair.subject)),
                               "baseline_tokens_per_s": round(statistics.median(pair.baseline))}
    return {
        "shape": shape,
        "params": param_count(options),
        "tokens_per_step": work.tokens_per_step,
        "steps_per_measurement": steps,
        "threads": torch.get_num_threads(),
        "matmul_peak_gflops": {p: round(v / 1e9, 1) for p, v in peak.items()},
        "bf16_over_fp32_matmul": round(peak["bf16"] / peak["fp32"], 3),
        "cases": cases,
        "bf16_over": bf16_over,
        "llmforge_peak_rss_above_baseline_mb": round(llmforge_peak_rss, 1),
        "import_s": {"torch": round(torch_import_s, 2), "megatron_and_llmforge": round(llmforge_import_s, 2)},
        "build_s": {"llmforge": round(llmforge_build_s, 2), "reference": round(reference_build_s, 3)},
        "llmforge_import_plus_build_s": round(torch_import_s + llmforge_import_s + llmforge_build_s, 2),
        "reference_import_plus_build_s": round(torch_import_s + reference_build_s, 2),
    }


def _run_worker(shape: str, *, steps: int, pairs: int, quick: bool) -> dict:
    argv = [sys.executable, str(Path(__file__).resolve()), "--worker", shape, "--steps", str(steps), "--pairs", str(pairs)]
    proc = subprocess.run(argv + (["--quick"] if quick else []), cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"train_step worker {shape} exited {proc.returncode}: {proc.stderr.strip()[-800:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def train_step(quick: bool) -> dict:
    """Median llmforge / reference tokens/s per alternating pair; the figure is the worst shape × precision."""
    shapes = {shape: _run_worker(shape, steps=1 if quick else 2, pairs=1 if quick else 3, quick=quick) for shape in SHAPES}
    ratios = {f"{shape}/{p}": out["cases"][p]["ratio"] for shape, out in shapes.items() for p in PRECISIONS}
    worst = min(ratios.values())
    return result("train_step", worst, f">= {GOAL}", worst >= GOAL, unit="x", details={
        "ratios": ratios,
        "shapes": shapes,
        "note": "figure = the lowest of the shape/precision median ratios (llmforge tokens/s over the reference's, same batch, "
                "one process, alternating; llmforge's bf16 against the reference's autocast); mfu = tokens/s × 6N+6Lhs FLOPs "
                "per token / the 2048² matmul peak of the computing dtype; bf16_over = llmforge's bf16 tokens/s over its own "
                "bf16-autocast and fp32 steps, alternating",
    })


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="one shape's train-step measurements (a worker of the train_step benchmark)")
    parser.add_argument("--worker", choices=SHAPES, required=True)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    import warnings

    warnings.filterwarnings("ignore")  # megatron's "Apex is not installed" notices
    print(json.dumps(_worker(args.worker, steps=args.steps, pairs=args.pairs, quick=args.quick)))
