"""MFU's peak FLOP/s: a GPU's datasheet from the planner's catalog, a CPU's own matmul peak measured."""

from __future__ import annotations

import json

import pytest
import torch
import torch.utils.benchmark as benchmark

from llmforge.plan.catalog import CATALOG, match_gpu
from llmforge.runtime import device
from llmforge.runtime.device import cpu_core_peak, rank_cores, rank_peak


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMFORGE_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("LLMFORGE_PEAK_FLOPS", raising=False)
    return tmp_path / device.CACHE_FILE


def test_gpu_names_map_to_catalog_entries():
    assert match_gpu("NVIDIA H100 80GB HBM3") is CATALOG["h100-80gb"]
    assert match_gpu("NVIDIA H200").peak_flops("fp32") == CATALOG["h200-141gb"].peak_flops_fp32
    assert match_gpu("Tesla T4") is None


def test_a_cpu_peak_is_never_below_what_a_plain_matmul_reaches(cache):
    """MFU over 100% was the symptom (a catalog figure below this CPU's one-thread rate): the
    measured peak must bound torch's own GEMM rate, timed here by torch.utils.benchmark."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for dtype, torch_dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            a, b = torch.randn(768, 768, dtype=torch_dtype), torch.randn(768, 768, dtype=torch_dtype)
            timer = benchmark.Timer("torch.mm(a, b)", globals={"torch": torch, "a": a, "b": b}, num_threads=1)
            achieved = 2 * 768**3 / timer.blocked_autorange(min_run_time=0.3).median
            peak = cpu_core_peak(dtype)["flops"]
            assert achieved <= 1.1 * peak, (dtype, achieved, peak)
            assert peak < 50 * achieved  # and not absurdly above it
    finally:
        torch.set_num_threads(threads)


def test_the_peak_is_measured_once_per_dtype_and_cached(cache, monkeypatch):
    calls = []
    monkeypatch.setattr(device, "_measure", lambda dtype, size: calls.append(dtype) or {"fp32": 1e11, "bf16": 2e11}[dtype])
    assert cpu_core_peak("fp32")["flops"] == 1e11 and cpu_core_peak("bf16")["flops"] == 2e11
    assert cpu_core_peak("fp32")["flops"] == 1e11
    assert calls == ["fp32", "bf16"]
    entries = json.loads(cache.read_text())
    assert sorted(entry["flops"] for entry in entries.values()) == [1e11, 2e11]
    assert all(torch.__version__ in key and "one core" in key for key in entries)
    assert not list(cache.parent.glob(".*.tmp"))  # written atomically


def test_a_corrupt_or_unwritable_cache_means_measuring_again(cache, monkeypatch, tmp_path):
    monkeypatch.setattr(device, "_measure", lambda dtype, size: 3e10)
    cache.write_text("{not json")
    assert cpu_core_peak("fp32")["flops"] == 3e10
    assert list(json.loads(cache.read_text()).values())[0]["flops"] == 3e10
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("LLMFORGE_CACHE_DIR", str(blocker / "cache"))  # a directory that cannot be made
    assert cpu_core_peak("fp32")["flops"] == 3e10


def test_a_rank_peak_is_its_cores_times_one_core(cache, monkeypatch):
    monkeypatch.setattr(device, "_measure", lambda dtype, size: {"fp32": 1e11, "bf16": 2e11}[dtype])
    monkeypatch.setattr(device.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert rank_cores() == 1 and rank_peak("fp32", "cpu")[0] == 1e11
        torch.set_num_threads(2)
        assert rank_cores() == 2 and rank_peak("bf16", "cpu")[0] == 4e11 and rank_peak("bf16-autocast", "cpu")[0] == 4e11
        # two ranks of two threads each on two cores share them: the job's peak stays the machine's
        assert rank_cores(local_world_size=2) == 1 and rank_peak("fp32", "cpu", local_world_size=2)[0] == 1e11
        assert rank_cores(local_world_size=4) == 0.5
        flops, source = rank_peak("fp32", "cpu")
        assert flops == 2e11 and source.startswith("2 × this CPU's fp32 matmul peak on one core, 100.0 GFLOP/s") and str(cache) in source
    finally:
        torch.set_num_threads(threads)
    monkeypatch.setenv("LLMFORGE_PEAK_FLOPS", "1e12")
    assert rank_peak("fp32", "cpu") == (1e12, "LLMFORGE_PEAK_FLOPS, 1,000.0 GFLOP/s a rank")


def test_a_gpu_peak_is_the_datasheet_and_an_unknown_gpu_has_none(monkeypatch):
    monkeypatch.delenv("LLMFORGE_PEAK_FLOPS", raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "NVIDIA H100 80GB HBM3")
    flops, source = rank_peak("bf16", "cuda:0")
    assert flops == CATALOG["h100-80gb"].peak_flops_bf16 and source == "the NVIDIA H100 SXM 80 GB datasheet's dense bf16 peak, 989.4 TFLOP/s"
    assert rank_peak("fp32", "cuda:0")[0] == CATALOG["h100-80gb"].peak_flops_fp32
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "Tesla T4")
    assert rank_peak("bf16", "cuda") == (0.0, "no datasheet peak for Tesla T4 (set LLMFORGE_PEAK_FLOPS for MFU)")


def test_memory_is_the_peak_not_what_is_resident_now():
    from llmforge.runtime.device import memory_mb

    before = memory_mb()
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    during = memory_mb()
    del block
    assert during >= before
    assert memory_mb() >= during  # freed memory leaves the high-water mark where it was
