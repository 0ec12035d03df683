"""'Does not fit' and the cheapest change: the fix, applied to the spec, must fit."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmforge.plan.build import build_plan
from llmforge.plan.catalog import CATALOG, get_device
from llmforge.plan.fit import HEADROOM, usable_bytes_per_rank
from llmforge.plan.memory import Layout
from llmforge.registry.manager import get_registry
from llmforge.spec.errors import UserError
from llmforge.spec.validate import load_and_validate

SPEC_7B = str(Path(__file__).resolve().parents[3] / "specs" / "7b-pretrain.yaml")


def plan(overrides: list[str], gpu: str, spec_path: str = SPEC_7B) -> dict:
    spec, _ = load_and_validate(spec_path, overrides, check_inputs=False)
    return build_plan(spec, registry=get_registry(), device=get_device(gpu), run_dir=Path("/nonexistent"), spec_path=spec_path)


def pretrain(p: dict) -> dict:
    return next(s for s in p["stages"] if s["name"] == "pretrain")


ONE_NODE_NO_SAVINGS = ["parallelism.nnodes=1", "parallelism.recompute_granularity=none", "parallelism.use_distributed_optimizer=false",
                       "stages.1.train.micro_batch_size=4", "stages.1.train.global_batch_size=1024"]


def test_the_7b_spec_fits_its_h100s():
    p = plan([], "h100-80gb")
    assert p["fits"] and pretrain(p)["fix"] is None
    assert p["largest_memory"]["total"] == max(r["total"] for r in p["memory_per_rank"])


def test_a_fix_applied_as_overrides_makes_the_stage_fit():
    before = pretrain(plan(ONE_NODE_NO_SAVINGS, "a100-40gb"))
    assert not before["fits"]
    fix = before["fix"]
    assert fix["largest_total"] <= fix["usable_bytes_per_rank"]
    after = pretrain(plan(ONE_NODE_NO_SAVINGS + fix["overrides"], "a100-40gb"))
    assert after["fits"]
    assert after["largest_total"] == fix["largest_total"]
    assert after["step_time_s"] == pytest.approx(fix["step_time_s"])


def test_the_cheapest_fix_is_the_free_one_when_it_is_enough():
    # Sharding Adam over 2 data-parallel ranks saves 12.5 GiB per rank and costs no time.
    before = pretrain(plan(["parallelism.nnodes=1", "parallelism.use_distributed_optimizer=false"], "a100-40gb"))
    assert not before["fits"]
    assert before["fix"]["overrides"] == ["parallelism.use_distributed_optimizer=true"]
    assert before["fix"]["step_time_s"] == pytest.approx(before["step_time_s"])


def test_when_no_layout_fits_the_devices_the_fix_asks_for_more():
    p = pretrain(plan(["parallelism.nnodes=1", "parallelism.nproc_per_node=2", "parallelism.tensor_model_parallel_size=1",
                       "parallelism.pipeline_model_parallel_size=1", "parallelism.sequence_parallel=false",
                       "stages.1.train.global_batch_size=1024"], "l40s-48gb"))
    assert not p["fits"]
    assert p["fix"]["world_size"] > 2  # 16 B per parameter: 7B does not fit 2 × 43 GiB at all
    assert any(o.startswith("parallelism.nproc_per_node=") or o.startswith("parallelism.nnodes=") for o in p["fix"]["overrides"])


def test_cpu_ranks_share_the_machine_memory():
    cpu = CATALOG["cpu"]
    lay = Layout(tensor=1, pipeline=1, virtual=1, data=2, sequence_parallel=False, recompute="none", distributed_optimizer=False,
                 micro_batch_size=1, global_batch_size=2, nnodes=1, nproc_per_node=2)
    assert usable_bytes_per_rank(cpu, lay) == int(cpu.memory_bytes * (1 - HEADROOM) / 2)
    assert usable_bytes_per_rank(CATALOG["h100-80gb"], lay) == int(CATALOG["h100-80gb"].memory_bytes * (1 - HEADROOM))


def test_unknown_device_names_the_known_ones():
    with pytest.raises(UserError, match="unknown --gpu 'h100'") as err:
        get_device("h100")
    assert "h100-80gb" in str(err.value)


def test_on_cpus_the_fix_adds_machines_not_ranks_that_would_share_one():
    p = pretrain(plan(["parallelism.nnodes=1", "parallelism.nproc_per_node=1", "parallelism.tensor_model_parallel_size=1",
                       "parallelism.pipeline_model_parallel_size=1", "parallelism.sequence_parallel=false"], "cpu"))
    assert not p["fits"]
    assert any(o.startswith("parallelism.nnodes=") for o in p["fix"]["overrides"])
    assert not any(o.startswith("parallelism.nproc_per_node=") for o in p["fix"]["overrides"])
