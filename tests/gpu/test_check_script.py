"""benchmarks/gpu_check.py and the CPU reference, checked where the GPU check is prepared (no CUDA needed)."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tests.gpu import reference

ROOT = Path(__file__).resolve().parents[2]


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("device", ["h200-141gb", "h100-80gb"])
def test_the_benchmark_micro_batch_is_the_largest_the_plan_fits(device, monkeypatch):
    monkeypatch.chdir(ROOT)
    check = _gpu_check()
    micro, spec, plan = next(check.fitting_micro_batches(check.SPEC, [], device))
    index = check.training_stage_index(spec)
    assert spec.stages[index].train.micro_batch_size == micro and plan["stages"][index]["fits"]
    global_batch = spec.stages[index].train.global_batch_size
    larger = [m for m in range(micro + 1, global_batch + 1) if global_batch % m == 0]
    for m in larger:
        _, bigger = check.plan_at(check.SPEC, [f"stages.{index}.train.micro_batch_size={m}"], device)
        assert not bigger["stages"][index]["fits"], f"micro batch {m} fits on {device} too"


def test_memory_check_compares_the_largest_rank_with_the_measured_peak():
    check = _gpu_check()
    stage = {"largest_total": 110, "largest_pipeline_stage": 0, "memory_per_rank": [{"total": 110}]}
    assert check.memory_check(stage, 100) | {"planned_breakdown": None} == {
        "planned_bytes": 110, "planned_breakdown": None, "measured_bytes": 100, "planned_over_measured": 1.1,
        "error": 0.1, "goal": "within 10%", "met": True}
    assert check.memory_check(stage, 90)["met"] is False  # 22% over
    assert check.memory_check(stage, None)["met"] is None  # nothing measured on a CPU


def test_the_cpu_reference_fixture_is_usable():
    """The fixture the GPU parity test reads: current schema, every precision, finite and falling losses."""
    from llmforge.spec.components import AdamW, GPTModel

    ref = reference.read_reference()
    GPTModel(**ref["setup"]["model"])
    AdamW(**ref["setup"]["optimizer"])
    assert set(ref["runs"]) == set(reference.PRECISIONS)
    for run in ref["runs"].values():
        assert len(run["losses"]) == len(run["grad_norms"]) == ref["setup"]["steps"]
        assert all(math.isfinite(x) for x in run["losses"] + run["grad_norms"])
        assert run["losses"][-1] < run["losses"][0]
    assert ref["runs"]["bf16"]["losses"][0] == pytest.approx(ref["runs"]["fp32"]["losses"][0], rel=1e-3)


@pytest.mark.slow
def test_dry_run_writes_every_figure(tmp_path):
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--dry-run", "--out", str(tmp_path), "--warmup", "1", "--steps", "2"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["ok"] and result["dry_run"] and result["plan_device"] == "cpu"
    tests = result["tests"]
    assert tests["failed"] == 0 and tests["skipped"] > 0 and tests["passed"] == 0, "without CUDA every gpu test skips"
    bench = result["benchmark"]
    assert bench["micro_batch_size"] == result["plan"]["micro_batch_size"] and len(bench["step_s"]) == 2 and bench["finite"]
    assert bench["mfu_datasheet"] == pytest.approx(bench["tokens_per_s"] * bench["flops_per_token"] / bench["peaks"]["datasheet"], rel=1e-2)
    assert result["memory"]["planned_bytes"] == result["plan"]["largest_total"] and result["memory"]["measured_bytes"] is None
    assert result["matmul_peak"]["flops"] > 0 and result["matmul_peak"]["dtype"] == "float32"  # bf16 8192³ on a GPU
    # Each check the issue names has its line; without CUDA the tests skip and FP8 says why.
    assert set(tests["lines"]) == set(check_module().TEST_LINES) and all("skipped" in line for line in tests["lines"].values())
    assert result["fp8"] == {"skipped": "no TransformerEngine"} and "fp8: skipped (no TransformerEngine)" in proc.stdout
    saved = bench["async_save"]  # checkpoint.async_save on the benchmark's own state, its marker verified
    assert saved["complete"] and saved["files_verified"] > 0 and saved["blocked_s"] > 0 and saved["sync_save_s"] > 0


def check_module():
    return _gpu_check()


def test_test_lines_group_outcomes_by_check():
    check = _gpu_check()
    lines = check.test_lines({"tests.gpu.test_documents::test_a": "passed", "tests.gpu.test_documents::test_b": "failed",
                              "tests.gpu.test_fp8::test_c": "skipped"})
    assert lines["packed documents (SDPA block-causal mask on CUDA)"] == "1 failed, 1 passed"
    assert lines["fp8 on TransformerEngine"] == "1 skipped" and lines["CPU-reference loss parity"] == "not run"


def test_only_fp8_tests_may_skip_on_a_gpu_without_transformer_engine(monkeypatch):
    import importlib.util

    check = _gpu_check()
    outcomes = {"tests.gpu.test_fp8::test_c": "skipped", "tests.gpu.test_parity::test_p": "skipped",
                "tests.gpu.test_documents::test_a": "passed"}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    assert check.unexpected_skips(outcomes) == ["tests.gpu.test_parity::test_p"]
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())
    assert check.unexpected_skips(outcomes) == ["tests.gpu.test_fp8::test_c", "tests.gpu.test_parity::test_p"]


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16", "bf16-autocast"])
def test_the_memory_probe_attributes_a_layers_saved_tensors_and_compares_the_plan(tmp_path, precision):
    """benchmarks/memory_probe.py on the CPU (on the device it runs from gpu_memory_probe.sh)."""
    out = tmp_path / "probe.json"
    small = ["model.num_layers=2", "model.hidden_size=128", "model.num_attention_heads=4", "model.ffn_hidden_size=352",
             "model.seq_length=128", "tokenizer.vocab_size=1000", "model.vocab_size=1000", "stages.1.train.micro_batch_size=4",
             "stages.1.train.global_batch_size=8", f"stages.1.train.precision={precision}"]
    proc = subprocess.run([sys.executable, "benchmarks/memory_probe.py", "specs/gpu-1b.yaml", *small, "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, env={**__import__("os").environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    modules = {t["module"] for t in result["layer_tensors"]}
    assert {"input_layernorm", "self_attention.core_attention", "mlp.linear_fc1", "pre_mlp_layernorm"} <= modules
    # The probe enters the stage's autocast: bf16 activations in both precisions, not fp32 layers.
    assert any(t["dtype"] == "bfloat16" and t["module"] == "mlp.linear_fc2" for t in result["layer_tensors"])
    assert set(result["saved_by_part"]) == {"layer0", "layer1", "other"}
    # The CPU's terms, as the CPU reality tests hold them (tests/unit/plan/test_reality.py): within 15%.
    assert result["saved_layers_mean"] == pytest.approx(result["planned_layer_total"], rel=0.15)
    assert result["steps"]["step2"]["allocated_before"] is None  # no CUDA: no allocator figures
