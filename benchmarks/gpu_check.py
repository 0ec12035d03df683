"""The GPU check: the `gpu` tests, then the ~1B spec's speed, MFU and peak memory against the plan, in bf16 and FP8.

On the device machine `benchmarks/gpu_check.sh` installs the carried wheels and runs this
script. On a CPU machine:

    python benchmarks/gpu_check.py --prepare    # the tiny spec's shards + tokenizer to carry, and the CPU reference
    python benchmarks/gpu_check.py --dry-run    # the same path with a tiny model, no CUDA

The `gpu` tests include packed documents through SDPA's block-causal mask on CUDA
(tests/gpu/test_documents.py), the CPU-reference loss parity (tests/gpu/test_parity.py),
FP8 through TransformerEngine (tests/gpu/test_fp8.py) and an asynchronous checkpoint save;
each has its own line in the result.

Figures, all written to `<out>/gpu_check.json` (`$OUT` on the device):
- the device's measured peak: an 8192³ bf16 matmul, timed here (788 TFLOP/s on this kind
  of machine in KINDS.md, 2026-10-28);
- tokens/s of specs/gpu-1b.yaml (megatron's native bf16) at the largest micro batch `llmforge
  plan --gpu h200-141gb` says fits (a divisor of the global batch, so the step is the spec's);
- MFU = tokens/s / devices × (6·N + 6·L·h·s) / one device's peak (`model_flops_utilization`,
  llmforge's one definition), against the measured peak (goal 40%, stretch 45%) and the
  datasheet's dense bf16 peak;
- the plan's predicted peak (the largest `memory_per_rank` total) against
  `torch.cuda.max_memory_allocated()`, within 10%;
- the same for `precision: fp8` where TransformerEngine imports (its speed over bf16, its
  MFU over the bf16 peak, as torchtitan reports it), else `fp8: skipped (no TransformerEngine)`.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import itertools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # llmforge from the working tree, and tests.gpu.reference

SPEC = "specs/gpu-1b.yaml"
GPU = "h200-141gb"
# KINDS.md, nvidia-h200, 2026-10-28: torch bf16 8192×8192×8192 matmul on random data; the
# check measures its own and reports both.
KINDS_MATMUL_FLOPS = 788e12
MATMUL_SIZE = 8192
MFU_GOAL, MFU_STRETCH = 0.40, 0.45  # of the measured matmul rate
FP8_OVERRIDE = "stages.1.train.precision=fp8"
MEMORY_GOAL = 0.10  # |planned − measured| / measured
MAX_TRIES = 3  # micro batches tried, largest first, when one runs out of memory
# A model that steps in well under a second on 2 cores; the rest of the spec is the 1B one's.
DRY_RUN_OVERRIDES = [
    "model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=2", "model.ffn_hidden_size=176",
    "tokenizer.vocab_size=512", "model.vocab_size=512", "model.seq_length=64", "stages.1.train.global_batch_size=16",
]
RESULT_VERSION = 1


def log(message: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {message}", flush=True)


# --- the plan ---------------------------------------------------------------------------


def plan_at(spec_path: str, overrides: list[str], device_name: str) -> tuple[Any, dict[str, Any]]:
    """(validated spec, plan dict) exactly as `llmforge plan SPEC OVERRIDES --gpu DEVICE --json` computes them."""
    from llmforge.plan.build import build_plan
    from llmforge.plan.catalog import get_device
    from llmforge.registry.manager import get_registry
    from llmforge.spec.validate import load_and_validate

    registry = get_registry()
    spec, _ = load_and_validate(str(ROOT / spec_path), overrides, registry=registry, check_inputs=False)
    plan = build_plan(spec, registry=registry, device=get_device(device_name), run_dir=Path(spec.resolved_run_dir), spec_path=spec_path)
    return spec, plan


def training_stage_index(spec: Any) -> int:
    return next(i for i, s in enumerate(spec.stages) if getattr(s, "train", None) is not None)


def fitting_micro_batches(spec_path: str, overrides: list[str], device_name: str) -> Iterator[tuple[int, Any, dict[str, Any]]]:
    """Micro batches dividing the global batch that the plan says fit, largest first, each with its spec and plan."""
    spec, _ = plan_at(spec_path, overrides, device_name)
    index = training_stage_index(spec)
    global_batch = spec.stages[index].train.global_batch_size // spec.parallelism.resolved_data_parallel_size()
    for micro in sorted((m for m in range(1, global_batch + 1) if global_batch % m == 0), reverse=True):
        spec, plan = plan_at(spec_path, [*overrides, f"stages.{index}.train.micro_batch_size={micro}"], device_name)
        if plan["stages"][index]["fits"]:
            yield micro, spec, plan


# --- the tests --------------------------------------------------------------------------


def run_gpu_tests(out: Path, *, timeout_s: float) -> dict[str, Any]:
    """`pytest -m gpu tests/gpu` in a fresh process; counts read from its JUnit report."""
    report = out / "gpu_tests.xml"
    argv = [sys.executable, "-m", "pytest", "tests/gpu", "-m", "gpu", "-q", "-p", "no:cacheprovider", f"--junitxml={report}"]
    log("running " + " ".join(argv[1:]))
    start = time.perf_counter()
    try:
        proc = subprocess.run(argv, cwd=ROOT, timeout=timeout_s)
        returncode = proc.returncode
    except subprocess.TimeoutExpired:
        returncode = None
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    failed: list[str] = []
    outcomes: dict[str, str] = {}  # "module::test" → passed, failed or skipped
    if report.is_file():
        root = ET.parse(report).getroot()
        suites = [root] if root.tag == "testsuite" else list(root)
        for suite in suites:
            for key in counts:
                counts[key] += int(suite.get(key, 0))
            for case in suite.iter("testcase"):
                name = f"{case.get('classname')}::{case.get('name')}"
                if case.find("failure") is not None or case.find("error") is not None:
                    failed.append(name)
                    outcomes[name] = "failed"
                else:
                    outcomes[name] = "skipped" if case.find("skipped") is not None else "passed"
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {"returncode": returncode, "timed_out": returncode is None, "seconds": round(time.perf_counter() - start, 1),
            "passed": passed, "failed": counts["failures"] + counts["errors"], "skipped": counts["skipped"], "failed_tests": failed,
            "outcomes": outcomes}


# The checks the issue names, each a line of the result: gpu test modules by what they check.
TEST_LINES = {"packed documents (SDPA block-causal mask on CUDA)": "test_documents", "CPU-reference loss parity": "test_parity",
              "CUDA path (nccl, no CPU shims, bf16 and autocast)": "test_cuda_path", "fp8 on TransformerEngine": "test_fp8"}


def unexpected_skips(outcomes: dict[str, str]) -> list[str]:
    """Skipped gpu tests that should have run here: all of them but FP8's when TransformerEngine does not import."""
    import importlib.util

    no_te = importlib.util.find_spec("transformer_engine") is None
    return [name for name, outcome in outcomes.items() if outcome == "skipped" and not (no_te and "test_fp8" in name)]


def test_lines(outcomes: dict[str, str]) -> dict[str, str]:
    """{check: "3 passed" / "2 skipped" / "1 failed, 1 passed"} from the gpu tests' outcomes."""
    lines = {}
    for what, module in TEST_LINES.items():
        mine = [o for name, o in outcomes.items() if f"{module}::" in name or name.split("::")[0].endswith(module)]
        counts = {o: mine.count(o) for o in ("failed", "passed", "skipped") if o in mine}
        lines[what] = ", ".join(f"{n} {o}" for o, n in counts.items()) or "not run"
    return lines


# --- the benchmark ----------------------------------------------------------------------


def mfu(bench: dict[str, Any], peak_flops: float) -> float:
    """Model FLOPs utilization of the benchmark: the model's own FLOPs (no recompute) per second per device over its peak."""
    from llmforge.plan.cost import model_flops_utilization

    return model_flops_utilization(bench["tokens_per_s"], bench["flops_per_token"], world_size=bench["world_size"], peak_flops=peak_flops)


def benchmark(spec: Any, *, warmup: int, steps: int, async_save: bool = False) -> dict[str, Any]:
    """Train steps of the spec's training stage on random tokens; time and peak memory.

    The model, optimizer and TrainStep are built as the pretrain stage builds them; the
    data is random because speed does not depend on it, and the loader is timed elsewhere.
    """
    import torch

    from llmforge.models.size import flops_per_token
    from llmforge.registry.manager import get_registry
    from llmforge.runtime.distributed import init_distributed
    from llmforge.runtime.optim import param_groups, wrap_optimizer
    from llmforge.runtime.step import TrainStep

    registry = get_registry()
    train = spec.stages[training_stage_index(spec)].train
    on_gpu = torch.cuda.is_available()
    ctx = init_distributed(spec.parallelism, seed=spec.seed)
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    fp8 = {"fp8": options} if (options := train.fp8_options()) else {}
    chunks = registry.factory("model", spec.model.name)(spec.model, spec.parallelism, precision=train.precision, seed=spec.seed, **fp8)
    opt = train.optimizer
    groups = param_groups(chunks, weight_decay=getattr(opt, "weight_decay", 0.0), decay_embeddings=getattr(opt, "decay_embeddings", True))
    optimizer = wrap_optimizer(registry.build("optimizer", opt, params=groups), chunks, spec.parallelism)
    seq = spec.model.seq_length
    step = TrainStep(chunks, optimizer, parallelism_ctx=ctx, seq_length=seq, micro_batch_size=train.micro_batch_size,
                     precision=train.precision, clip_grad=train.clip_grad)
    build_s = time.perf_counter() - start
    micro_batches = train.global_batch_size // (train.micro_batch_size * ctx.dp_size)
    generator = torch.Generator().manual_seed(spec.seed)
    batches = [torch.randint(0, spec.model.vocab_size, (train.micro_batch_size, seq + 1), generator=generator) for _ in range(micro_batches)]
    log(f"built in {build_s:.1f} s on {ctx.device} ({ctx.backend}); {warmup} warm-up + {steps} timed steps of "
        f"{micro_batches} × {train.micro_batch_size} × {seq} tokens")

    losses, times = [], []
    for index in range(warmup + steps):
        began = time.perf_counter()
        result = step(batches, opt.lr)  # returns after a host sync on the step's loss
        if on_gpu:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - began
        losses.append(result.loss)
        if index >= warmup:
            times.append(elapsed)
        log(f"step {index + 1}: loss {result.loss:.4f}, grad norm {result.grad_norm:.3f}, {elapsed:.3f} s" + (" (warm-up)" if index < warmup else ""))
    # The training peak, before the save's own copies touch the device.
    peak_allocated = torch.cuda.max_memory_allocated() if on_gpu else None
    peak_reserved = torch.cuda.max_memory_reserved() if on_gpu else None
    saved = async_save_check(chunks, optimizer, lambda: step(batches, opt.lr), on_gpu=on_gpu) if async_save else None
    tokens_per_step = train.global_batch_size * seq
    tokens_per_s = tokens_per_step * len(times) / sum(times)
    per_token = flops_per_token(spec.model, seq)
    return {
        "device": str(ctx.device),
        "backend": ctx.backend,
        "world_size": ctx.world_size,
        "micro_batch_size": train.micro_batch_size,
        "global_batch_size": train.global_batch_size,
        "num_microbatches": micro_batches,
        "tokens_per_step": tokens_per_step,
        "build_s": round(build_s, 2),
        "step_s": [round(t, 4) for t in times],
        "median_step_s": round(statistics.median(times), 4),
        "tokens_per_s": round(tokens_per_s, 1),
        "flops_per_token": per_token,
        "achieved_flops": tokens_per_s * per_token,
        "losses": [round(x, 4) for x in losses],
        "finite": all(math.isfinite(x) for x in losses),
        "max_memory_allocated": peak_allocated,
        "max_memory_reserved": peak_reserved,
        **({"async_save": saved} if saved is not None else {}),
    }


def async_save_check(chunks: Any, optimizer: Any, train_step: Any, *, on_gpu: bool) -> dict[str, Any]:
    """`checkpoint.async_save` on this model's state: how long a save holds the training thread in the
    background (the second one: the first allocates the pinned host buffers) against the same save
    written at once, the steps that run while its files are written, and that its COMPLETE
    marker's checksums verify. Written under /tmp and deleted: the 1B state is ~16 GB."""
    import shutil
    import tempfile

    import torch

    from llmforge.runtime.checkpoint import CheckpointManager, verify
    from llmforge.runtime.sharded_io import SnapshotPool, deferred_writes, save_sharded

    root = Path(tempfile.mkdtemp(prefix="gpu_check_ckpt_", dir="/tmp"))
    manager = CheckpointManager(root, keep_last=1, log=lambda message: None)
    pool = SnapshotPool()

    def sync() -> None:
        torch.cuda.synchronize() if on_gpu else None

    def write(tmp: Path) -> None:
        (tmp / "model").mkdir()
        save_sharded(tmp / "model", chunks, optimizer, {})

    def stage(tmp: Path):
        (tmp / "model").mkdir()
        with deferred_writes(pool) as deferred:
            save_sharded(tmp / "model", chunks, optimizer, {})
        return deferred

    try:
        sync()
        start = time.perf_counter()
        manager.save(1, write, {"version": 1, "step": 1})
        sync_s = time.perf_counter() - start
        blocked = []
        for step in (2, 3):
            manager.settle()
            sync()
            start = time.perf_counter()
            path = manager.save_async(step, stage, {"version": 1, "step": step})
            sync()
            blocked.append(time.perf_counter() - start)
        during = []
        while manager.writing:
            began = time.perf_counter()
            train_step()
            sync()
            during.append(time.perf_counter() - began)
        manager.settle()
        files = len(verify(path)["files"])
        out = {"sync_save_s": round(sync_s, 3), "first_blocked_s": round(blocked[0], 3), "blocked_s": round(blocked[1], 3),
               "blocked_over_sync": round(blocked[1] / sync_s, 3), "steps_during_write": len(during),
               "step_s_during_write": [round(t, 4) for t in during], "complete": True, "files_verified": files}
    finally:
        manager.settle(timeout=600)
        shutil.rmtree(root, ignore_errors=True)
    log(f"async save: blocked {out['blocked_s']:.2f} s against {out['sync_save_s']:.2f} s written at once "
        f"({out['blocked_over_sync']:.2f}x), {out['steps_during_write']} steps during the write, {files} files verified")
    return out


def memory_check(plan_stage: dict[str, Any], measured: int | None) -> dict[str, Any]:
    """The plan's largest rank against the measured peak; None figures where nothing was measured (CPU)."""
    planned = plan_stage["largest_total"]
    largest = plan_stage["memory_per_rank"][plan_stage["largest_pipeline_stage"]]
    out: dict[str, Any] = {"planned_bytes": planned, "planned_breakdown": largest, "measured_bytes": measured,
                           "planned_over_measured": None, "error": None, "goal": f"within {MEMORY_GOAL:.0%}", "met": None}
    if measured:
        error = abs(planned - measured) / measured
        out.update(planned_over_measured=round(planned / measured, 4), error=round(error, 4), met=error <= MEMORY_GOAL)
    return out


# --- the machine ------------------------------------------------------------------------


def environment() -> dict[str, Any]:
    import torch

    env: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cpu_count": os.cpu_count(),
    }
    try:
        from importlib.metadata import version

        env["megatron_core"] = version("megatron-core")
    except Exception as e:  # a report field, not a requirement
        env["megatron_core"] = f"unknown ({type(e).__name__})"
    try:
        import transformer_engine  # noqa: F401

        env["transformer_engine"] = True
    except ImportError:
        env["transformer_engine"] = False
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, gpu_memory_bytes=props.total_memory, multiprocessors=props.multi_processor_count,
                   capability=f"{props.major}.{props.minor}", flash_sdp_enabled=torch.backends.cuda.flash_sdp_enabled())
        try:  # torch moves TF32 to `fp32_precision`; a report field must not end the run
            env["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
        except Exception as e:
            env["tf32_matmul"] = f"unknown ({type(e).__name__})"
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30)
            env["nvidia_smi"] = smi.stdout.strip()
        except (OSError, subprocess.TimeoutExpired) as e:
            env["nvidia_smi"] = f"unavailable ({type(e).__name__})"
    return env


# --- what the device needs from here ------------------------------------------------------


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def prepare_carry() -> int:
    """The tiny spec's shards and tokenizer under .gpu_data/tiny, then the CPU reference if stale."""
    from llmforge.data.prepare import run_prepare
    from llmforge.spec.validate import load_and_validate
    from tests.gpu import reference

    spec, _ = load_and_validate(str(ROOT / "specs" / "tiny.yaml"))
    stage = next(s for s in spec.stages if s.type == "prepare")
    run_prepare(spec, reference.TINY_RUN, stage, log=log)
    if reference.is_current():
        log(f"{reference.FIXTURE.relative_to(ROOT)} matches the carried data")
    else:
        log(f"the carried data or the tiny spec changed: writing {reference.FIXTURE.relative_to(ROOT)} again")
        reference.write_reference()
    wheels, data = folder_bytes(ROOT / ".whl"), folder_bytes(reference.CARRY_DIR)
    log(f"carried: .whl {wheels / 2**20:.1f} MiB (benchmarks/gpu_wheels.sh), .gpu_data {data / 2**20:.1f} MiB")
    return 0


# --- the whole check --------------------------------------------------------------------


def write_result(path: Path, result: dict[str, Any]) -> None:
    from llmforge.atomic import atomic_write_text

    atomic_write_text(path, json.dumps(result, indent=2) + "\n")


def check(out: Path, *, dry_run: bool, skip_tests: bool, warmup: int, steps: int, tests_timeout_s: float) -> dict[str, Any]:
    import torch

    on_gpu = torch.cuda.is_available()
    if not on_gpu and not dry_run:
        raise SystemExit("no CUDA device: run with --dry-run on a CPU machine")
    device_name = "cpu" if dry_run and not on_gpu else GPU
    overrides = DRY_RUN_OVERRIDES if dry_run else []
    result: dict[str, Any] = {"version": RESULT_VERSION, "dry_run": dry_run, "spec": SPEC, "overrides": overrides,
                              "plan_device": device_name, "environment": environment()}
    path = out / "gpu_check.json"
    write_result(path, result)  # something comes back even if a later part dies

    if not skip_tests:
        tests = run_gpu_tests(out, timeout_s=tests_timeout_s)
        # On a GPU a skipped gpu test is a check not made, except the FP8 ones where TransformerEngine
        # is absent (the image lacks it; the result says `fp8: skipped`); on a CPU every one of them skips.
        tests["ok"] = tests["returncode"] == 0 and (not on_gpu or not unexpected_skips(tests["outcomes"]))
        result["tests"] = tests
        log(f"gpu tests: {tests['passed']} passed, {tests['failed']} failed, {tests['skipped']} skipped ({tests['seconds']} s)")
        tests["lines"] = test_lines(tests["outcomes"])
        for what, line in tests["lines"].items():
            log(f"  {what}: {line}")
        write_result(path, result)

    result["matmul_peak"] = measure_matmul_peak(on_gpu)
    log(f"measured matmul peak: {result['matmul_peak']['flops'] / 1e12:,.1f} TFLOP/s ({result['matmul_peak']['what']})")
    write_result(path, result)

    bench = run_benchmark(result, path, overrides, device_name, on_gpu=on_gpu, warmup=warmup, steps=steps, key="benchmark")
    if bench is None:
        result["ok"] = False
        write_result(path, result)
        return result
    result["fp8"] = fp8_benchmark(result, path, overrides, device_name, on_gpu=on_gpu, warmup=warmup, steps=steps)
    result["ok"] = bool(bench["finite"] and result.get("tests", {"ok": True})["ok"]
                        and result["fp8"].get("finite", True) and bench["async_save"]["complete"])
    write_result(path, result)
    return result


def measure_matmul_peak(on_gpu: bool, *, repeats: int = 20) -> dict[str, Any]:
    """This device's bf16 matmul rate: 8192³ on a GPU; on a CPU (dry run) a small fp32 one, only to run the path."""
    import torch

    n, dtype, device = (MATMUL_SIZE, torch.bfloat16, "cuda") if on_gpu else (256, torch.float32, "cpu")
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    if on_gpu:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if on_gpu:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / repeats
    return {"flops": 2 * n**3 / seconds, "size": n, "dtype": str(dtype).removeprefix("torch."), "seconds_each": seconds,
            "what": f"{n}³ {str(dtype).removeprefix('torch.')} matmul on {device}, {repeats} timed",
            "kinds_md_flops": KINDS_MATMUL_FLOPS if on_gpu else None}


def run_benchmark(result: dict[str, Any], path: Path, overrides: list[str], device_name: str, *, on_gpu: bool, warmup: int,
                  steps: int, key: str) -> dict[str, Any] | None:
    """The spec at the largest micro batch the plan fits (should it not fit after all, that is a
    planner error worth its figures, and the next smaller one still gives the speed): speed, MFU
    and the plan's memory against the measured peak, under result[key] (and key + "_plan", ...)."""
    import torch

    bench = None
    failures = result.setdefault("out_of_memory", [])
    for micro, spec, plan in itertools.islice(fitting_micro_batches(SPEC, overrides, device_name), MAX_TRIES):
        stage = plan["stages"][training_stage_index(spec)]
        log(f"[{key}] plan on {device_name}: micro batch {micro} fits (largest rank {stage['largest_total'] / 2**30:.2f} GiB of "
            f"{stage['usable_bytes_per_rank'] / 2**30:.2f} GiB usable); {plan['params_total']:,} parameters")
        overrides_text = " ".join([*overrides, f"stages.{training_stage_index(spec)}.train.micro_batch_size={micro}"])
        result[f"{key}_plan" if key != "benchmark" else "plan"] = {
            "micro_batch_size": micro, "command": f"llmforge plan {SPEC} {overrides_text} --gpu {device_name} --json",
            "params_total": plan["params_total"], "flops_per_token": plan["flops_per_token"],
            "largest_total": stage["largest_total"], "usable_bytes_per_rank": stage["usable_bytes_per_rank"],
            "predicted_tokens_per_s": stage["tokens_per_s"], "assumed_mfu": plan["mfu"]}
        write_result(path, result)
        try:
            bench = benchmark(spec, warmup=warmup, steps=steps, async_save=key == "benchmark")
            break
        except torch.cuda.OutOfMemoryError as e:
            measured = torch.cuda.max_memory_allocated()
            failures.append({"run": key, "micro_batch_size": micro, "planned_bytes": stage["largest_total"],
                             "max_memory_allocated": measured, "error": str(e)[:400]})
            log(f"[{key}] out of memory at micro batch {micro} (planned {stage['largest_total'] / 2**30:.2f} GiB): {str(e)[:200]}")
        finally:
            gc.collect()
            if on_gpu:
                torch.cuda.empty_cache()
        write_result(path, result)
    if bench is None:
        return None
    # MFU over the bf16 peak in every precision (FP8 too: its attention, norms and output layer are bf16).
    peak = plan["device"]["peak_flops_fp32"] if stage["precision"] == "fp32" else plan["device"]["peak_flops_bf16"]
    measured_peak = result["matmul_peak"]["flops"] if on_gpu else peak
    bench["precision"] = stage["precision"]
    bench["mfu_datasheet"] = round(mfu(bench, peak), 4)
    bench["mfu_measured_matmul"] = round(mfu(bench, measured_peak), 4)
    bench["peaks"] = {"datasheet": peak, "measured_matmul": measured_peak,
                      "measured_matmul_source": result["matmul_peak"]["what"] if on_gpu else "no GPU: the catalog's CPU peak stands in"}
    bench["mfu_goal"] = {"goal": MFU_GOAL, "stretch": MFU_STRETCH, "met": bench["mfu_measured_matmul"] >= MFU_GOAL,
                         "stretch_met": bench["mfu_measured_matmul"] >= MFU_STRETCH}
    bench["memory"] = memory_check(stage, bench["max_memory_allocated"])
    result[key] = bench
    if key == "benchmark":
        result["memory"] = bench["memory"]
    log(f"[{key}] {bench['tokens_per_s']:,.0f} tokens/s; MFU {bench['mfu_measured_matmul']:.1%} of the measured matmul peak, "
        f"{bench['mfu_datasheet']:.1%} of the datasheet's")
    memory = bench["memory"]
    if memory["measured_bytes"]:
        log(f"[{key}] peak memory: planned {memory['planned_bytes'] / 2**30:.2f} GiB, measured {memory['measured_bytes'] / 2**30:.2f} GiB "
            f"(error {memory['error']:.1%})")
    write_result(path, result)
    return bench


def fp8_benchmark(result: dict[str, Any], path: Path, overrides: list[str], device_name: str, *, on_gpu: bool, warmup: int,
                  steps: int) -> dict[str, Any]:
    """The 1B spec again in precision fp8, where TransformerEngine imports on a GPU; else why not."""
    import importlib.util

    if importlib.util.find_spec("transformer_engine") is None:
        log("fp8: skipped (no TransformerEngine)")
        return {"skipped": "no TransformerEngine"}
    if not on_gpu:
        log("fp8: skipped (no CUDA device)")
        return {"skipped": "no CUDA device"}
    bench = run_benchmark(result, path, [*overrides, FP8_OVERRIDE], device_name, on_gpu=on_gpu, warmup=warmup, steps=steps, key="fp8_run")
    if bench is None:
        return {"skipped": "out of memory at every micro batch tried", "finite": False}
    bf16 = result["benchmark"]
    speedup = bench["tokens_per_s"] / bf16["tokens_per_s"]
    log(f"fp8: {speedup:.2f}× bf16's tokens/s (the plan assumes ~1.3× end to end)")
    return {"tokens_per_s": bench["tokens_per_s"], "speedup_over_bf16": round(speedup, 3), "mfu_over_bf16_peak": bench["mfu_datasheet"],
            "mfu_measured_matmul": bench["mfu_measured_matmul"], "memory": bench["memory"], "finite": bench["finite"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="no CUDA: the same path with a tiny model on the CPU")
    parser.add_argument("--prepare", action="store_true", help="make .gpu_data (the tiny spec's shards and tokenizer) and the CPU reference")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or ROOT / "benchmarks" / "_work" / "gpu_check"),
                        help="where gpu_check.json goes (default: $OUT, else benchmarks/_work/gpu_check)")
    parser.add_argument("--skip-tests", action="store_true", help="only the benchmark")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps (cuBLAS heuristics, allocator growth)")
    parser.add_argument("--steps", type=int, default=8, help="timed steps")
    parser.add_argument("--tests-timeout", type=float, default=240, help="seconds the gpu tests may take")
    args = parser.parse_args(argv)
    if args.prepare:
        return prepare_carry()
    args.out.mkdir(parents=True, exist_ok=True)
    result = check(args.out, dry_run=args.dry_run, skip_tests=args.skip_tests, warmup=args.warmup, steps=args.steps,
                   tests_timeout_s=args.tests_timeout)
    from llmforge.runtime.distributed import shutdown

    shutdown()
    log(f"wrote {args.out / 'gpu_check.json'}: {'ok' if result['ok'] else 'NOT ok'}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
