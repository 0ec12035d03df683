"""The planner's CUDA terms against what an H200 measured (tests/unit/plan/h200_measured.json).

The figures came from the GPU check's device run of 2026-12-04 (docs/performance.md): the
bytes one transformer layer of megatron's local spec keeps for backward (distinct storages,
parameters excluded, `benchmarks/memory_probe.py`), the forward's transient beyond what it
keeps (the bf16 logits beside megatron's in-place fp32 cross entropy), and
`torch.cuda.max_memory_allocated()` over training steps of specs/gpu-1b.yaml. They are
torch's CUDA kernels' figures, not llmforge's: the fused RMSNorm keeps no normalized input,
fp32 attention copies SDPA's output for the projection, flash attention's output is a view.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmforge.plan.build import build_plan
from llmforge.plan.catalog import get_device
from llmforge.plan.memory import Layout, layer_activation_terms, logits_bytes
from llmforge.registry.manager import get_registry
from llmforge.spec.validate import load_and_validate

ROOT = Path(__file__).resolve().parents[3]
MEASURED = json.loads(Path(__file__).with_name("h200_measured.json").read_text())


def _spec(case: dict):
    spec, _ = load_and_validate(str(ROOT / case["spec"]), case["overrides"], check_inputs=False)
    return spec


@pytest.mark.parametrize("case", MEASURED["layers"], ids=lambda c: c["case"])
def test_one_layer_keeps_what_the_h200_measured(case):
    spec = _spec(case)
    terms = layer_activation_terms(spec.model, precision=case["precision"], tensor=1, sequence_parallel=False,
                                   micro_batch_size=case["micro_batch_size"], seq_length=case["seq_length"], device="cuda")
    assert sum(terms.values()) == pytest.approx(case["layer_saved_bytes"], rel=1e-3)
    # The CPU's composite RMSNorm keeps more: the plan for a CPU must not be the CUDA one.
    on_cpu = layer_activation_terms(spec.model, precision=case["precision"], tensor=1, sequence_parallel=False,
                                    micro_batch_size=case["micro_batch_size"], seq_length=case["seq_length"], device="cpu")
    assert (sum(on_cpu.values()) > sum(terms.values())) == (spec.model.normalization == "RMSNorm")


@pytest.mark.parametrize("case", MEASURED["layers"], ids=lambda c: c["case"])
def test_the_loss_transient_is_what_the_h200_measured(case):
    spec = _spec(case)
    lay = Layout(tensor=1, pipeline=1, virtual=1, data=1, sequence_parallel=False, recompute="none", distributed_optimizer=False,
                 micro_batch_size=case["micro_batch_size"], global_batch_size=case["micro_batch_size"], nnodes=1, nproc_per_node=1)
    _, transient = logits_bytes(spec.model, lay, case["seq_length"], case["precision"], device="cuda")
    if case["precision"] == "fp32":  # the cross entropy works in place in the logits: a few small tensors
        assert transient == 0 and case["forward_transient_bytes"] < 1e-3 * case["layer_saved_bytes"]
    else:  # the bf16 logits, beside some small tensors of the loss
        assert transient == pytest.approx(case["forward_transient_bytes"], rel=0.1)


def test_the_1b_step_peak_is_within_two_percent_of_the_h200s():
    peak = MEASURED["step_peak"]
    spec = _spec(peak)
    plan = build_plan(spec, registry=get_registry(), device=get_device("h200-141gb"), run_dir=Path("/nonexistent"),
                      spec_path=peak["spec"])
    stage = next(s for s in plan["stages"] if s.get("memory_per_rank"))
    assert stage["largest_total"] == pytest.approx(peak["max_memory_allocated"], rel=0.02)
