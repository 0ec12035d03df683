"""Device facts for reporting: peak FLOP/s (for MFU) and memory in use."""

from __future__ import annotations

import os

# Measured on the 2-core CI/developer CPU (2048² matmul, 2 threads); override with
# LLMFORGE_PEAK_FLOPS when your CPU differs.
CPU_PEAK = {"fp32": 133e9, "bf16": 379e9}
# Dense bf16 datasheet peaks by device-name fragment.
GPU_PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12}


def peak_flops(precision: str, device: str) -> float:
    if "LLMFORGE_PEAK_FLOPS" in os.environ:
        return float(os.environ["LLMFORGE_PEAK_FLOPS"])
    if str(device).startswith("cuda"):
        import torch

        name = torch.cuda.get_device_name()
        peak = next((v for k, v in GPU_PEAK_BF16.items() if k in name), 0.0)
        return peak if precision == "bf16" else peak / 2
    threads = max(1, _threads())
    return CPU_PEAK.get(precision, CPU_PEAK["fp32"]) * threads / 2


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def memory_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import psutil

    return psutil.Process().memory_info().rss / 2**20
