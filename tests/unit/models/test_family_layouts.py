"""The family switches train alike in every layout: TP=2 (with and without sequence
parallelism) and PP=2 give one process's initial weights, losses, grad norms and final weights.

The q/k norms are the case to watch: one weight shared by all heads while each TP rank
holds only its own heads, so their gradients are partial per rank and must be summed over
TP (megatron's finalize_model_grads does it for `qk_layernorm`). The run reuses
test_step_parity's Trainer; this file is also the worker
(`python -m torch.distributed.run ... test_family_layouts.py --out DIR`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
STEPS = 4
# Every switch at once, on test_step_parity's toy Llama (hidden 64, 4 heads, 2 query groups).
SWITCHES = {"qk_layernorm": True, "kv_channels": 24, "add_qkv_bias": True, "rope_scaling_factor": 8.0, "rotary_base": 500000.5}
LAYOUTS = {
    "single": {},
    "tp2": {"tensor_model_parallel_size": 2},
    "tp2_sp": {"tensor_model_parallel_size": 2, "sequence_parallel": True},
    "pp2": {"pipeline_model_parallel_size": 2},
}


def main() -> None:
    import torch

    from tests.unit.runtime.test_step_parity import Trainer, gathered_weights

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    world = int(os.environ.get("WORLD_SIZE", 1))
    results = {}
    for layout, parallelism in LAYOUTS.items():
        if (layout == "single") != (world == 1):
            continue
        trainer = Trainer("llama", model=SWITCHES, **parallelism)
        results[layout] = trainer.train(range(STEPS))
        final = gathered_weights(trainer.chunks)
        if trainer.ctx.rank == 0:
            torch.save({"initial": trainer.initial, "final": final}, args.out / f"weights_{layout}.pt")
    rank = int(os.environ.get("RANK", 0))
    (args.out / f"{'pair' if world > 1 else 'single'}_rank{rank}.json").write_text(json.dumps(results))

    from llmforge.runtime.distributed import shutdown

    shutdown()


def _launch(nproc: int, out: Path) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", __file__, "--out", str(out)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-6000:]}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("family_layouts")
    _launch(2, out)
    _launch(1, out)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tp2", "tp2_sp", "pp2"])
def test_family_switches_train_alike_in_every_layout(runs, layout):
    import torch

    single = json.loads((runs / "single_rank0.json").read_text())["single"]
    for rank in (0, 1):
        got = json.loads((runs / f"pair_rank{rank}.json").read_text())[layout]
        assert max(abs(a - b) for a, b in zip(got["losses"], single["losses"])) < 2e-6
        assert max(abs(a - b) for a, b in zip(got["grad_norms"], single["grad_norms"])) < 1e-5
    reference, weights = torch.load(runs / "weights_single.pt"), torch.load(runs / f"weights_{layout}.pt")
    assert sorted(weights["initial"]) == sorted(reference["initial"])
    assert any("q_layernorm" in name for name in reference["initial"])
    for name, tensor in reference["initial"].items():
        assert torch.equal(weights["initial"][name], tensor), name
    for name, tensor in reference["final"].items():
        assert torch.allclose(weights["final"][name], tensor, atol=1e-6, rtol=0), name
    # The q/k norms really trained, so the comparison above says something about their gradients.
    assert not torch.equal(reference["final"]["decoder.layers.0.self_attention.q_layernorm.weight"],
                           reference["initial"]["decoder.layers.0.self_attention.q_layernorm.weight"])


if __name__ == "__main__":
    main()
