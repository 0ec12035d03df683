"""MFU's peak FLOP/s comes from the planner's catalog: one table for `plan` and `run`."""

from __future__ import annotations

import torch

from llmforge.plan.catalog import CATALOG, match_gpu
from llmforge.runtime.device import peak_flops


def test_gpu_names_map_to_catalog_entries():
    assert match_gpu("NVIDIA H100 80GB HBM3") is CATALOG["h100-80gb"]
    assert match_gpu("NVIDIA H200").peak_flops("fp32") == CATALOG["h200-141gb"].peak_flops_fp32
    assert match_gpu("Tesla T4") is None


def test_cpu_peak_scales_with_threads_and_env_overrides(monkeypatch):
    monkeypatch.delenv("LLMFORGE_PEAK_FLOPS", raising=False)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = peak_flops("bf16", "cpu")
        torch.set_num_threads(2)
        assert peak_flops("bf16", "cpu") == 2 * one == CATALOG["cpu"].peak_flops_bf16
        assert peak_flops("fp32", "cpu") < peak_flops("bf16", "cpu")
    finally:
        torch.set_num_threads(threads)
    monkeypatch.setenv("LLMFORGE_PEAK_FLOPS", "1e12")
    assert peak_flops("fp32", "cpu") == 1e12
