"""Device facts for reporting: peak FLOP/s (for MFU) and memory in use."""

from __future__ import annotations

import datetime
import json
import os
import platform
import time
from pathlib import Path

CACHE_FILE = "cpu_peak.json"
# A measurement runs matmuls until the best has not improved by 1% for 0.1 s (0.2 s at least, 1 s
# at most): the first dozen run ~20% slow while the core ramps up, and one another process
# interrupts reads low; a peak read low would overstate MFU.
_MIN_S, _STEADY_S, _MAX_S = 0.2, 0.1, 1.0
_SIZE = 512  # runs one core at its peak: 2.7 ms a matmul here


def rank_peak(precision: str, device: str, *, local_world_size: int = 1) -> tuple[float, str]:
    """(one rank's peak dense FLOP/s for MFU, where it comes from, in words).

    A GPU's is its datasheet peak from the planner's catalog (an unknown GPU reports 0 and MFU is
    left out). A CPU has no datasheet to read, so it is the cores the rank computes on
    (`rank_cores`) times one core's matmul peak in the rank's dtype, measured on this machine
    once and cached (`cpu_core_peak`). LLMFORGE_PEAK_FLOPS overrides either.
    """
    if "LLMFORGE_PEAK_FLOPS" in os.environ:
        peak = float(os.environ["LLMFORGE_PEAK_FLOPS"])
        return peak, f"LLMFORGE_PEAK_FLOPS, {peak / 1e9:,.1f} GFLOP/s a rank"
    if str(device).startswith("cuda"):
        import torch

        from llmforge.plan.catalog import match_gpu

        name = torch.cuda.get_device_name()
        known = match_gpu(name)
        if known is None:
            return 0.0, f"no datasheet peak for {name} (set LLMFORGE_PEAK_FLOPS for MFU)"
        peak = known.peak_flops(precision)
        return peak, f"the {known.description} datasheet's dense {_peak_dtype(precision)} peak, {peak / 1e12:,.1f} TFLOP/s"
    dtype, cores = _peak_dtype(precision), rank_cores(local_world_size)
    measured = cpu_core_peak(dtype)
    return cores * measured["flops"], (f"{cores:g} × this CPU's {dtype} matmul peak on one core, {measured['flops'] / 1e9:,.1f} "
                                       f"GFLOP/s (measured {measured['measured'][:10]}, cached in {measured['cache']})")


def _peak_dtype(precision: str) -> str:
    # As the catalog's Device.peak_flops: fp32's peak for fp32, bf16's for every other precision (fp8 too).
    return "fp32" if precision == "fp32" else "bf16"


def rank_cores(local_world_size: int = 1) -> float:
    """The cores one rank's matmuls can use: its torch threads, but no more than its share of the
    CPUs this process may run on (ranks that oversubscribe the cores share them, so the job's
    peak never exceeds the machine's)."""
    import torch

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(float(torch.get_num_threads()), cpus / max(1, local_world_size))


def cpu_core_peak(dtype: str) -> dict:
    """{"flops", "size", "measured", "cache"}: one core's best square-matmul rate in `dtype`.

    The practical peak MFU compares with on a CPU, as benchmarks/ and the GPU check measure theirs:
    MKL's or oneDNN's GEMM, not a clock times a vector width (a VM does not show its boost clock).
    One thread, because a rank's peak is its cores times one core's: on this 2-vCPU VM a 2-thread
    measurement reads anything from one core's rate to twice it as the host lends the second core
    or not, and the one-core figure holds still. Cached per CPU model, CPU count, torch version and
    dtype (`cache_dir()`); delete the file to measure again.
    """
    import torch

    key = f"{cpu_name()} | {os.cpu_count()} cpus | torch {torch.__version__} | {dtype} | one core"
    path = cache_dir() / CACHE_FILE
    known = _read(path).get(key)
    if isinstance(known, dict) and isinstance(known.get("flops"), (int, float)) and known["flops"] > 0:
        return {**known, "cache": str(path)}
    entry = {"flops": _measure(dtype, _SIZE), "size": _SIZE,
             "measured": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    _write(path, key, entry)
    return {**entry, "cache": str(path)}


def cache_dir() -> Path:
    """LLMFORGE_CACHE_DIR, else $XDG_CACHE_HOME/llmforge, else ~/.cache/llmforge."""
    if os.environ.get("LLMFORGE_CACHE_DIR"):
        return Path(os.environ["LLMFORGE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "llmforge"


def _measure(dtype: str, size: int) -> float:
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
        a, b = torch.randn(size, size, dtype=torch_dtype), torch.randn(size, size, dtype=torch_dtype)
        torch.mm(a, b)  # the thread pool and the packing buffers
        start = improved = now = time.perf_counter()
        best = float("inf")
        while now - start < _MIN_S or (now - improved < _STEADY_S and now - start < _MAX_S):
            began = now
            torch.mm(a, b)
            now = time.perf_counter()
            if now - began < 0.99 * best:
                improved = now
            best = min(best, now - began)
        return 2 * size**3 / best
    finally:
        torch.set_num_threads(saved)


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else what `platform` says."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write(path: Path, key: str, entry: dict) -> None:
    """Merge one entry in, atomically; a cache that cannot be written only means measuring again next run."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {**_read(path), key: entry}
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        pass


def memory_mb() -> float:
    """This rank's peak memory so far, MiB: torch's peak allocated on a GPU, the process's peak
    resident set on a CPU (the train rows' `memory_mb`: a high-water mark on both)."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux
