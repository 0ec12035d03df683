"""A hand-launched job (as srun or the user's own torchrun starts one) of another size than the spec says is refused at start."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def test_two_ranks_for_a_spec_of_one_are_refused_before_any_work(llmforge, fault_dir):
    run_dir = fault_dir / "world-mismatch"
    job = llmforge.ranks("--run-dir", str(run_dir), "stages.1.train.max_steps=2", world=2, nproc_per_node=1)
    codes = job.wait(600)
    results = [job.result(rank) for rank in range(2)]
    assert codes == [2, 2], results[0].output[-3000:]
    for result in results:
        assert "started 2 processes" in result.stderr and "nproc_per_node 1 = 1" in result.stderr, result.stderr[-2000:]
        assert "parallelism.nproc_per_node=2" in result.stderr  # the override that fixes it
    assert not run_dir.exists()  # no run dir, no prepared data, no process group
