"""The planner against what llmforge really allocates on this CPU.

A worker (reality_worker.py) builds each case with `build_gpt`, counts the bytes autograd
saves for backward in one micro batch, runs one real TrainStep, and counts parameter,
gradient and optimizer-state storage. The plan must match: state bytes exactly (up to the
distributed optimizer's alignment padding), activations within 15%.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from llmforge.models import size
from llmforge.plan.memory import Layout, memory_per_rank
from llmforge.spec.validate import load_and_validate

ROOT = Path(__file__).resolve().parents[3]
WORKER = Path(__file__).with_name("reality_worker.py")
TINY_PARAMS = 50_000_000


def tiny_specs() -> list[str]:
    """Every shipped spec small enough to build on a CPU in a test."""
    out = []
    # examples/eval_tasks/ holds lm-evaluation-harness task YAMLs, not specs.
    for path in sorted([*ROOT.glob("specs/*.yaml"), *(p for p in ROOT.glob("examples/**/*.yaml") if "eval_tasks" not in p.parts)]):
        spec, _ = load_and_validate(str(path), check_inputs=False)
        if any(getattr(s, "train", None) for s in spec.stages) and size.param_count(spec.model) < TINY_PARAMS:
            out.append(str(path.relative_to(ROOT)))
    return out


def one_micro_batch(spec_path: str, *more: str, data_parallel: int = 1) -> dict:
    """A case whose first training stage does a single micro batch per rank (cheap to step)."""
    spec, _ = load_and_validate(str(ROOT / spec_path), check_inputs=False)
    index, stage = next((i, s) for i, s in enumerate(spec.stages) if getattr(s, "train", None))
    mbs = stage.train.micro_batch_size
    return {"spec": spec_path, "overrides": [f"stages.{index}.train.global_batch_size={mbs * data_parallel}", *more]}


def measure(cases: list[dict], nprocs: int, tmp_path: Path, *, worker: Path = WORKER) -> list[list[dict]]:
    """Run the worker on `nprocs` local ranks; results[case][rank]."""
    cases_file = tmp_path / "cases.json"
    cases_file.write_text(json.dumps(cases))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(nprocs):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nprocs), "LOCAL_WORLD_SIZE": str(nprocs),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "PYTHONWARNINGS": "ignore",
               # the plan models megatron's layers; CPU's lean layers save less (models/lean.py)
               "LLMFORGE_LEAN_LAYERS": "0"}
        procs.append(subprocess.Popen([sys.executable, str(worker), str(cases_file), str(tmp_path / "out")], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=600)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    per_rank = [json.loads((tmp_path / f"out.{rank}.json").read_text()) for rank in range(nprocs)]
    return [[per_rank[r][c] for r in range(nprocs)] for c in range(len(cases))]


def check(case: dict, ranks: list[dict]) -> None:
    """Each rank's measured bytes against the plan for its pipeline stage."""
    spec, _ = load_and_validate(str(ROOT / case["spec"]), case["overrides"], check_inputs=False)
    train = next(s for s in spec.stages if getattr(s, "train", None)).train
    plan = memory_per_rank(spec.model, Layout.from_spec(spec.parallelism, train), precision=train.precision,
                           optimizer=train.optimizer, device="cpu")
    # The distributed optimizer aligns each parameter in its buffers to 64 elements.
    slack = 64 * 64 * 4 if spec.parallelism.use_distributed_optimizer else 0
    for got in ranks:
        want = plan[got["pp_rank"]]
        where = f"{case} rank {got['rank']}"
        for key in ("weights", "gradients", "optimizer_states"):
            assert abs(got[key] - getattr(want, key)) <= slack, (where, key, got[key], getattr(want, key))
        if "saved_activations" in got:
            plan_bytes = want.activations + want.logits
            assert plan_bytes == pytest.approx(got["saved_activations"], rel=0.15), (where, plan_bytes, got["saved_activations"])


@pytest.mark.slow
def test_single_process_specs_and_recompute(tmp_path):
    cases = [one_micro_batch(path) for path in tiny_specs()]
    assert any("tiny.yaml" in c["spec"] for c in cases)
    cases += [
        one_micro_batch("specs/tiny.yaml", "parallelism.recompute_granularity=selective"),
        one_micro_batch("specs/tiny.yaml", "parallelism.recompute_granularity=full"),
        one_micro_batch("specs/tiny.yaml", "stages.1.train.precision=fp32", "stages.1.train.optimizer={name: sgd, momentum: 0.9}"),
        one_micro_batch("specs/tiny.yaml", "stages.1.train.optimizer={name: sgd, momentum: 0.9}"),  # bf16: master weights + momentum
        one_micro_batch("specs/tiny.yaml", "model.attention_dropout=0.1", "model.hidden_dropout=0.1"),  # CPU math attention
        one_micro_batch("specs/tiny.yaml", "stages.1.train.precision=bf16-autocast"),
        one_micro_batch("specs/tiny.yaml", "stages.1.train.precision=bf16-autocast", "parallelism.recompute_granularity=full"),
    ]
    for case, ranks in zip(cases, measure(cases, 1, tmp_path)):
        check(case, ranks)


@pytest.mark.slow
def test_two_ranks_tensor_sequence_pipeline_and_data_parallel(tmp_path):
    two = "parallelism.nproc_per_node=2"
    cases = [
        one_micro_batch("specs/tiny.yaml", two, "parallelism.tensor_model_parallel_size=2", "parallelism.sequence_parallel=true"),
        one_micro_batch("specs/tiny.yaml", two, "parallelism.tensor_model_parallel_size=2"),
        one_micro_batch("specs/tiny.yaml", two, "parallelism.pipeline_model_parallel_size=2"),
        one_micro_batch("specs/tiny.yaml", two, "parallelism.use_distributed_optimizer=true", data_parallel=2),
        # Experts sharded over EP, their optimizer state over the expert-data-parallel ranks; and whole
        # experts (expert TP 1) beside TP 2 attention.
        one_micro_batch("specs/moe-tiny.yaml", two, "parallelism.expert_model_parallel_size=2", "parallelism.use_distributed_optimizer=true",
                        data_parallel=2),
        one_micro_batch("specs/moe-tiny.yaml", two, "parallelism.expert_model_parallel_size=2", "parallelism.tensor_model_parallel_size=2",
                        "parallelism.sequence_parallel=true", "parallelism.expert_tensor_parallel_size=1"),
    ]
    results = measure(cases, 2, tmp_path)
    for case, ranks in zip(cases, results):
        check(case, ranks)
    # The distributed optimizer really halves the optimizer state of each rank: bf16 keeps 12 bytes per 2-byte weight.
    assert results[3][0]["optimizer_states"] < 0.51 * 6 * results[3][0]["weights"]
