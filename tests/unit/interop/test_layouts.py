"""Export gathers a checkpoint saved by 2 processes (TP=2 or PP=2, gloo on loopback) in one
process, and transformers then computes what the sharded model computed."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmforge.interop.export import export_hf

from .tiny import MODELS, build, forward, random_ids

pytest.importorskip("transformers")
WORKER = Path(__file__).with_name("layout_worker.py")
SEED = 21


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _save_with_two_processes(run_dir: Path, options: dict, *, tp: int, pp: int) -> None:
    port = _free_port()
    args = json.dumps({"run_dir": str(run_dir), "options": options, "tp": tp, "pp": pp, "seed": SEED})
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, str(WORKER), args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    try:
        outputs = [p.communicate(timeout=300)[0].decode(errors="replace") for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for rank, (p, out) in enumerate(zip(procs, outputs, strict=True)):
        assert p.returncode == 0, f"rank {rank} failed:\n{out[-4000:]}"


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
