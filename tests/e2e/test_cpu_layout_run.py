"""`llmforge run` picks two CPU processes for a small pretraining spec on its own (runtime.cpu_layout, issue 31).

The result must be the one the user gets by asking for that layout: the same losses to the
last bit, the same recorded spec, and the run says so at its start.
"""

from __future__ import annotations

import os

import pytest
import yaml

from llmforge.testing import run_spec

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two usable cores")]


def _losses(rows):
    return [(r["step"], r["loss"]) for r in rows if r["kind"] == "train"]


def test_the_chosen_layout_is_the_layout_asked_for(tmp_path):
    auto = run_spec(run_dir=tmp_path / "auto", max_steps=4, env={"LLMFORGE_AUTO_LAYOUT": "1", "OMP_NUM_THREADS": "1"})
    asked = run_spec(["parallelism.nproc_per_node=2", "stages.1.train.micro_batch_size=2"], run_dir=tmp_path / "asked", max_steps=4)
    one = run_spec(run_dir=tmp_path / "one", max_steps=4)  # the suite's default: the spec's own one process
    log = (tmp_path / "auto" / "run.log").read_text()
    assert "CPU layout: 2 processes × 1 thread, data parallel (micro batch 2 of 4 per process" in log
    recorded = yaml.safe_load((tmp_path / "auto" / "spec.resolved.yaml").read_text())
    assert recorded["parallelism"]["nproc_per_node"] == 2 and recorded["stages"][1]["train"]["micro_batch_size"] == 2
    assert _losses(auto) == _losses(asked) and len(_losses(auto)) == 4
    # the same samples per step as one process: the same losses up to the order of a sum
    for (step, a), (_, b) in zip(_losses(auto), _losses(one)):
        assert a == pytest.approx(b, rel=1e-4), step
    assert "CPU layout" not in (tmp_path / "one" / "run.log").read_text()
