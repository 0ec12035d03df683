"""Device facts for reporting: peak FLOP/s (for MFU) and memory in use."""

from __future__ import annotations

import os

def peak_flops(precision: str, device: str) -> float:
    """Peak dense FLOP/s for MFU, from the planner's device catalog (one table for both).

    LLMFORGE_PEAK_FLOPS overrides it (an unknown GPU, or a CPU unlike the 2-core one the
    catalog measured); an unknown GPU without it reports 0 and MFU is left out.
    """
    from llmforge.plan.catalog import CATALOG, match_gpu

    if "LLMFORGE_PEAK_FLOPS" in os.environ:
        return float(os.environ["LLMFORGE_PEAK_FLOPS"])
    if str(device).startswith("cuda"):
        import torch

        known = match_gpu(torch.cuda.get_device_name())
        return known.peak_flops(precision) if known is not None else 0.0
    # The catalog's CPU peak was measured on 2 threads; scale by the threads this run uses.
    return CATALOG["cpu"].peak_flops(precision) * max(1, _threads()) / 2


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def memory_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import psutil

    return psutil.Process().memory_info().rss / 2**20
