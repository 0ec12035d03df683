"""Export gathers a checkpoint saved by 2 processes (TP=2 or PP=2, gloo on loopback) in one
process, and transformers then computes what the sharded model computed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llmforge.interop.export import export_hf

from .tiny import MODELS, build, forward, random_ids, run_two_ranks

pytest.importorskip("transformers")
WORKER = Path(__file__).with_name("layout_worker.py")
SEED = 21


def _save_with_two_processes(run_dir: Path, options: dict, *, tp: int, pp: int) -> None:
    run_two_ranks(WORKER, {"run_dir": str(run_dir), "options": options, "tp": tp, "pp": pp, "seed": SEED})


@pytest.mark.slow
@pytest.mark.parametrize(("arch", "tp", "pp"), [("gpt2", 2, 1), ("llama", 2, 1), ("gpt2", 1, 2)])
def test_export_of_a_two_process_checkpoint_matches_its_forward(tmp_path, arch, tp, pp, hf_logits):
    run_dir = tmp_path / "run"
    _save_with_two_processes(run_dir, MODELS[arch], tp=tp, pp=pp)
    export_hf(run_dir, tmp_path / "hf")
    ids = random_ids()
    theirs = hf_logits(tmp_path / "hf", ids)
    if tp > 1:  # what the TP-sharded model itself computed
        torch.testing.assert_close(theirs, torch.load(run_dir / "logits.pt"), atol=1e-4, rtol=0)
    # Initialization is layout-invariant, so one process builds the same model from the seed.
    torch.testing.assert_close(theirs, forward(build(MODELS[arch], seed=SEED), ids), atol=1e-4, rtol=0)
