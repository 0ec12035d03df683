"""The CPU layout `llmforge run` picks for a small pretraining spec (runtime.cpu_layout, issue 31), and when it keeps one process."""

from __future__ import annotations

import pytest

from llmforge.runtime import cpu_layout, launch
from llmforge.spec.validate import load_and_validate
from llmforge.testing import TINY_SPEC


@pytest.fixture(autouse=True)
def _auto_on(monkeypatch):
    monkeypatch.delenv("LLMFORGE_AUTO_LAYOUT", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def _choose(overrides=(), **kwargs):
    spec, loaded = load_and_validate(str(TINY_SPEC), list(overrides), check_inputs=False)
    return cpu_layout.choose(spec, loaded.data, **kwargs)


def test_two_cores_give_two_processes_with_half_the_micro_batch_each():
    auto = _choose(cores=2)
    assert auto is not None and auto.processes == 2
    assert auto.overrides == ("parallelism.nproc_per_node=2", "stages.1.train.micro_batch_size=2")  # tiny: micro 4 of 8
    assert "2 processes × 1 thread" in auto.note and "nproc_per_node=1" in auto.note
    # It is a layout the user could have written: the spec validates with it.
    spec, _ = load_and_validate(str(TINY_SPEC), list(auto.overrides), check_inputs=False)
    assert spec.parallelism.world_size == 2 and spec.stages[1].train.micro_batch_size == 2


def test_more_cores_still_two_processes_each_with_its_share_as_threads(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS")
    auto = _choose(cores=8)
    assert auto.processes == 2 and "2 processes × 4 threads" in auto.note


@pytest.mark.parametrize("overrides", [
    ["parallelism.nproc_per_node=1"],                 # the user's own layout, even the default one written out
    ["parallelism.tensor_model_parallel_size=1"],
    ["stages.1.train.micro_batch_size=1", "stages.1.train.global_batch_size=8"],  # no even split of the micro batch
])
def test_a_spec_that_chose_its_layout_or_cannot_split_keeps_one_process(overrides):
    assert _choose(overrides, cores=2) is None


def test_one_core_or_threads_filling_the_cores_keep_one_process(monkeypatch):
    assert _choose(cores=1) is None
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert _choose(cores=2) is None


def test_the_off_switch_and_large_models(monkeypatch):
    assert _choose(["model.hidden_size=1024", "model.num_layers=24"], cores=2) is None  # past the measured size
    monkeypatch.setenv("LLMFORGE_AUTO_LAYOUT", "0")
    assert _choose(cores=2) is None


def test_a_finetuning_stage_keeps_one_process(root):
    spec, loaded = load_and_validate(str(root / "specs" / "tiny.yaml"), [], check_inputs=False)  # pretrain, then sft
    assert cpu_layout.choose(spec, loaded.data, cores=2) is None


def test_a_resumed_run_keeps_the_layout_it_started_with():
    assert _choose(cores=1, recorded={"parallelism": {"nproc_per_node": 2}}).processes == 2
    assert _choose(cores=2, recorded={"parallelism": {"nproc_per_node": 1}}) is None


def test_cpu_only_torch_is_read_without_importing_it(tmp_path, monkeypatch):
    import importlib.util
    import types

    def fake(text):
        package = tmp_path / "torch"
        package.mkdir(exist_ok=True)
        (package / "version.py").write_text(text)
        monkeypatch.setattr(importlib.util, "find_spec", lambda name: types.SimpleNamespace(submodule_search_locations=[str(package)]))
        return launch._cpu_only_torch()

    none = "cuda: Optional[str] = None\nhip: Optional[str] = None\nxpu: Optional[str] = None\n"
    assert fake(none)
    assert not fake(none.replace("cuda: Optional[str] = None", "cuda: Optional[str] = '12.8'"))
    assert not fake(none.replace("hip: Optional[str] = None", "hip = '6.2'"))
    assert not fake("cuda = None\n")  # a version.py it cannot read whole: ask torch


def test_plan_for_this_cpu_shows_the_layout_run_will_pick(root, monkeypatch):
    import json
    import subprocess
    import sys

    env = {**__import__("os").environ, "LLMFORGE_AUTO_LAYOUT": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "llmforge.cli", "plan", str(TINY_SPEC), "--gpu", "cpu", "--json"]
    plan = json.loads(subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout)
    if len(__import__("os").sched_getaffinity(0)) >= 2:
        assert plan["layout"]["world_size"] == 2 and "CPU layout: 2 processes" in plan["layout_note"]
    else:
        assert plan["layout"]["world_size"] == 1 and "layout_note" not in plan
    # planning for a GPU is planning for a cluster: the spec's own layout
    plan = json.loads(subprocess.run(command[:-3] + ["--json"], env=env, capture_output=True, text=True, check=True).stdout)
    assert plan["layout"]["world_size"] == 1 and "layout_note" not in plan
