"""A mixture-of-experts model trains alike at every expert layout, and its checkpoints reshard across EP.

megatron-core's MoE layer, router (top-2 of 4 experts, load-balancing loss 0.01 and z-loss 1e-3)
and token dispatchers, in fp32 with SGD and clipping active, as test_step_parity.py does for
dense layouts (its `Trainer` builds each layout). Three launches do all the work, one per world
size, and this file is their worker (`torchrun ... test_moe_parity.py --job pair`):

- `pair` (2 processes): EP=2 with the alltoall and the allgather dispatcher, EP=2 with the
  distributed optimizer (DP=2; each expert on one rank), the router metrics, and a checkpoint
  saved at EP=2;
- `single` (1 process): the references, the router metrics, and the EP=2 checkpoint resumed;
- `quad` (4 processes): EP=2 × TP=2 (sequence parallel, expert TP 2), EP=2 with PP=2, EP=2 with
  the distributed optimizer at DP=4 (experts sharded over their 2 replicas), and the EP=2
  checkpoint resumed at EP=2 × expert-DP=2.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

STEPS = 6
TOLERANCE = 1e-6  # float32 losses near 5.5 are 4.8e-7 apart; the layouts agree to 1-2 ulps
MOE = {"preset": "llama2-7b", "num_layers": 2, "num_query_groups": 2, "num_moe_experts": 4, "moe_router_topk": 2,
       "moe_ffn_hidden_size": 96, "moe_aux_loss_coeff": 0.01, "moe_z_loss_coeff": 1e-3}


# --- the worker ----------------------------------------------------------------------------


def _base():
    """test_step_parity's Trainer and helpers, with the MoE shape and an eval batch DP=4 can share."""
    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    import test_step_parity as base

    base.SHAPES["moe"] = MOE
    base.SHAPES["moe_without_router_losses"] = {**MOE, "moe_aux_loss_coeff": 0.0, "moe_z_loss_coeff": None}
    base._eval_batch = lambda: list(base._sequences(torch.Generator().manual_seed(999), 4 * base.MICRO_BATCH).split(base.MICRO_BATCH))
    return base


def _trainer(base, shape: str = "moe", **kwargs):
    return base.Trainer(shape, **kwargs)


def _router_metrics(base, **parallelism) -> dict:
    """megatron's router losses and the expert load after two steps, as a train row reports them."""
    from llmforge.models.moe import RouterMetrics
    from llmforge.spec.components import GPTModel
    from llmforge.models.presets import shrink

    trainer = _trainer(base, **parallelism)
    spec = dict(MOE)
    options = GPTModel(**shrink(spec.pop("preset"), **spec))
    metrics = RouterMetrics(trainer.chunks, options, micro_batches_per_step=base.MICRO_BATCHES // trainer.ctx.dp_size, device=trainer.ctx.device)
    trainer.train(range(2))
    metrics.steps = 2
    return metrics.read()


def job_pair(out: Path) -> dict:
    import torch

    base = _base()
    ep2 = {"expert_model_parallel_size": 2, "nproc_per_node": 2}
    adamw = {"optimizer": "adamw", "lr": 1e-3}
    results = {}
    trainer = _trainer(base, **ep2)
    if trainer.ctx.rank == 0:
        torch.save(trainer.initial, out / "init_ep2.pt")
    results["ep2"] = trainer.train(range(STEPS))
    results["ep2_allgather"] = _trainer(base, model={"moe_token_dispatcher_type": "allgather"}, **ep2).train(range(STEPS))
    results["ep2_distopt"] = _trainer(base, **adamw, use_distributed_optimizer=True, **ep2).train(range(STEPS))
    results["metrics_ep2"] = _router_metrics(base, **ep2)
    results["ckpt_ep2"] = base._checkpoint_then_continue(_trainer(base, **adamw, **ep2), out / "ckpt_ep2")
    return results


def job_single(out: Path) -> dict:
    import torch

    base = _base()
    adamw = {"optimizer": "adamw", "lr": 1e-3}
    trainer = _trainer(base)
    torch.save(trainer.initial, out / "init_single.pt")
    return {
        "single": trainer.train(range(STEPS)),
        "single_adamw": _trainer(base, **adamw).train(range(STEPS)),
        "single_dense_router": _trainer(base, "moe_without_router_losses").train(range(STEPS)),
        "metrics_single": _router_metrics(base),
        "load_ep2_at_ep1": base._resume(_trainer(base, **adamw, seed=7), out / "ckpt_ep2"),
    }


def job_quad(out: Path) -> dict:
    base = _base()
    ep2 = {"expert_model_parallel_size": 2, "nproc_per_node": 4}
    adamw = {"optimizer": "adamw", "lr": 1e-3}
    return {
        "ep2_tp2_sp": _trainer(base, tensor_model_parallel_size=2, sequence_parallel=True, **ep2).train(range(STEPS)),
        "ep2_pp2": _trainer(base, pipeline_model_parallel_size=2, **ep2).train(range(STEPS)),
        "ep2_distopt_dp4": _trainer(base, **adamw, use_distributed_optimizer=True, **ep2).train(range(STEPS)),
        "metrics_ep2_tp2_sp": _router_metrics(base, tensor_model_parallel_size=2, sequence_parallel=True, **ep2),
        "load_ep2_at_ep2_dp2": base._resume(_trainer(base, **adamw, seed=7, **ep2), out / "ckpt_ep2"),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--job", choices=["pair", "single", "quad"], required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    results = {"pair": job_pair, "single": job_single, "quad": job_quad}[args.job](args.out)
    rank = int(os.environ.get("RANK", 0))
    (args.out / f"{args.job}_rank{rank}.json").write_text(json.dumps(results, indent=1))

    from llmforge.runtime.distributed import shutdown

    shutdown()


# --- the tests -------------------------------------------------------------------------------


def _launch(job: str, nproc: int, out: Path) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", __file__, "--job", job, "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"})
    if done.returncode != 0:
        raise AssertionError(f"{job} job failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("moe_layouts")
    _launch("pair", 2, out)  # first: it writes the checkpoint the others resume
    _launch("single", 1, out)
    _launch("quad", 4, out)
    results = {name: json.loads((out / f"{name}.json").read_text())
               for name in ("pair_rank0", "pair_rank1", "single_rank0", "quad_rank0", "quad_rank3")}
    results["dir"] = out
    return results


def _close(a: list[float], b: list[float], tolerance: float = TOLERANCE) -> float:
    assert len(a) == len(b)
    worst = max(abs(x - y) for x, y in zip(a, b))
    assert worst <= tolerance, f"{a} vs {b}: max |diff| {worst:.2e} > {tolerance:.0e}"
    return worst


pytestmark = pytest.mark.slow

LAYOUTS = [("pair", "ep2", "single"), ("pair", "ep2_allgather", "single"), ("pair", "ep2_distopt", "single_adamw"),
           ("quad", "ep2_tp2_sp", "single"), ("quad", "ep2_pp2", "single"), ("quad", "ep2_distopt_dp4", "single_adamw")]


@pytest.mark.parametrize("job, case, reference", LAYOUTS, ids=[case for _, case, _ in LAYOUTS])
def test_expert_layout_trains_like_one_process(runs, job, case, reference):
    want = runs["single_rank0"][reference]
    last = "pair_rank1" if job == "pair" else "quad_rank3"
    for rank in (f"{job}_rank0", last):
        got = runs[rank][case]
        _close(got["losses"], want["losses"])
        _close(got["grad_norms"], want["grad_norms"], 1e-5)
    # Real learning, with clipping in every step.
    assert want["losses"][-1] < want["losses"][0] - 0.02
    assert min(want["grad_norms"]) > 0.5


def test_the_router_losses_take_part(runs):
    with_losses, without = runs["single_rank0"]["single"], runs["single_rank0"]["single_dense_router"]
    assert max(abs(a - b) for a, b in zip(with_losses["losses"], without["losses"])) > 1e-5


def test_initialization_places_global_experts(runs):
    import torch

    single = torch.load(runs["dir"] / "init_single.pt")
    ep2 = torch.load(runs["dir"] / "init_ep2.pt")
    assert sorted(single) == sorted(ep2)
    assert "decoder.layers.1.mlp.experts.local_experts.3.linear_fc2.weight" in ep2  # rank 1's second expert, by its global index
    for name in single:
        assert torch.equal(single[name], ep2[name]), name


@pytest.mark.parametrize("case, rank", [("metrics_ep2", "pair_rank0"), ("metrics_ep2_tp2_sp", "quad_rank0")])
def test_router_metrics_do_not_depend_on_the_layout(runs, case, rank):
    want, got = runs["single_rank0"]["metrics_single"], runs[rank][case]
    assert sorted(got) == sorted(want)
    assert {"moe/aux_loss", "moe/z_loss", "moe/load_max_min", "moe/layer0/expert3_load", "moe/layer1/load_max_min"} <= set(want)
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-5), key
    assert sum(want[f"moe/layer0/expert{e}_load"] for e in range(4)) == pytest.approx(1.0)
    assert 0.5 < want["moe/aux_loss"] < 2.0  # 1.0 when balanced


@pytest.mark.parametrize("loaded, rank", [("load_ep2_at_ep1", "single_rank0"), ("load_ep2_at_ep2_dp2", "quad_rank0"),
                                          ("load_ep2_at_ep2_dp2", "quad_rank3")])
def test_checkpoint_reshards_across_expert_parallelism(runs, loaded, rank):
    saved, got = runs["pair_rank0"]["ckpt_ep2"], runs[rank][loaded]
    assert got["eval_before_load"] != pytest.approx(saved["eval"], abs=1e-4)  # another seed: the load changes it
    assert got["eval"] == pytest.approx(saved["eval"], abs=TOLERANCE)
    assert got["next_loss"] == pytest.approx(saved["next_loss"], abs=TOLERANCE)
    assert got["common"] == {"step": 2, "note": "saved"}


if __name__ == "__main__":
    main()
