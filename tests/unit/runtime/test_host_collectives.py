"""All-reduces through shared memory among a host's CPU ranks (runtime.host_collectives, issue 31).

Real processes over gloo on loopback: every result is compared with gloo's own all-reduce of
the same tensors (bitwise for two ranks, where a + b is b + a; to rounding for three, whose
sums may be ordered otherwise), every rank must hold bitwise the same result, tensors larger
than a slot go through in chunks, and a rank that dies or hangs mid-call is raised as a lost
peer within the collective timeout, as gloo raises it, so `collective_failure` words it alike.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64") or not Path("/dev/shm").is_dir(),
                                reason="shared-memory all-reduces are used on x86-64 Linux only")

ROOT = Path(__file__).resolve().parents[3]

WORKER = r"""
import hashlib, json, os, sys, time
import torch, torch.distributed as dist
from llmforge.runtime import host_collectives as hc

rank, world, mode = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), sys.argv[1]
hc.SLOT_BYTES = 4096  # small slots: the larger tensors below go through in several chunks
dist.init_process_group("gloo", rank=rank, world_size=world)
host = hc.attach(dist.group.WORLD, timeout_s=float(os.environ.get("TIMEOUT", "30")))
out = {"attached": host is not None, "unlinked": host is not None and not os.path.exists(host.path)}
if mode == "dies":
    if rank == 1:
        os._exit(3)
    try:
        hc.all_reduce(torch.ones(4))
    except dist.DistError as e:
        from llmforge.runtime.distributed import collective_failure
        out["error"] = collective_failure(e, timeout_s=30)
    print(json.dumps(out), flush=True)
    os._exit(0)
if mode == "hangs":
    if rank == 1:
        time.sleep(6)  # past the survivor's 2 s timeout
        os._exit(0)
    started = time.monotonic()
    try:
        hc.all_reduce(torch.ones(4))
    except dist.DistError as e:
        from llmforge.runtime.distributed import collective_failure
        out["error"] = collective_failure(e, timeout_s=2)
        out["waited"] = time.monotonic() - started
    print(json.dumps(out), flush=True)
    os._exit(0)

cases = []
g = torch.Generator().manual_seed(1234 + rank)
shapes = [(), (1,), (7,), (1000,), (3000, 5), (64, 129)]  # (3000, 5) fp32 is 60 KB: 15 chunks of 4 KB
for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.int64):
    for shape in shapes:
        for op in ("SUM", "MAX", "MIN"):
            if dtype.is_floating_point:
                x = torch.randn(shape, generator=g).to(dtype)
            else:
                x = torch.randint(-1000, 1000, shape, generator=g)
            ours, theirs = x.clone(), x.clone()
            hc.all_reduce(ours, getattr(dist.ReduceOp, op))
            dist.all_reduce(theirs, op=getattr(dist.ReduceOp, op))
            cases.append({"case": f"{dtype} {shape} {op}", "same_as_gloo": bool(torch.equal(ours, theirs)),
                          "close_to_gloo": bool(torch.allclose(ours.double(), theirs.double(), rtol=0, atol=0.05 if dtype == torch.bfloat16 else 1e-5)),
                          "digest": hashlib.sha256(ours.contiguous().view(torch.uint8).numpy().tobytes() if ours.dim() else ours.reshape(1).view(torch.uint8).numpy().tobytes()).hexdigest()})
# A non-contiguous tensor comes back in place.
t = torch.arange(24, dtype=torch.float32).reshape(4, 6).t()
hc.all_reduce(t)
out["transposed"] = t.tolist()
out["cases"] = cases
print(json.dumps(out), flush=True)
dist.destroy_process_group()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _job(world: int, mode: str = "check", timeout: float = 120, extra: dict | None = None) -> list[dict]:
    port = _free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(extra or {})}
        procs.append(subprocess.Popen([sys.executable, "-c", WORKER, mode], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=timeout)
        lines = [line for line in stdout.splitlines() if line.startswith("{")]
        outs.append(json.loads(lines[-1]) if lines else {"stderr": stderr[-3000:], "code": proc.returncode})
    return outs


@pytest.fixture(scope="module")
def two_ranks():
    return _job(2)


def test_two_ranks_match_gloo_bit_for_bit_in_chunks_and_every_dtype(two_ranks):
    for out in two_ranks:
        assert out.get("attached"), out
        bad = [c["case"] for c in out["cases"] if not c["same_as_gloo"]]
        assert not bad, bad
    # every rank holds the same bytes
    assert [c["digest"] for c in two_ranks[0]["cases"]] == [c["digest"] for c in two_ranks[1]["cases"]]
    # a transposed (non-contiguous) tensor is reduced in place: twice the values, in the transposed layout
    want = [[2.0 * (r * 6 + c) for r in range(4)] for c in range(6)]
    assert two_ranks[0]["transposed"] == want == two_ranks[1]["transposed"]


def test_the_mapping_is_unlinked_once_every_rank_has_it(two_ranks):
    # Rank 0 made the file and removes it once every rank has mapped it: a killed job leaves nothing in /dev/shm.
    assert two_ranks[0]["unlinked"]


@pytest.mark.slow
def test_three_ranks_agree_with_each_other_and_with_gloo_to_rounding():
    outs = _job(3)
    for out in outs:
        assert out.get("attached"), out
        assert all(c["close_to_gloo"] for c in out["cases"]), [c["case"] for c in out["cases"] if not c["close_to_gloo"]]
    assert len({tuple(c["digest"] for c in out["cases"]) for out in outs}) == 1


def test_a_rank_that_dies_mid_call_is_a_lost_peer():
    survivor = _job(2, "dies", timeout=60)[0]
    assert survivor.get("error") and "lost contact with another rank" in survivor["error"], survivor
    assert "closed its connection" in survivor["error"] and "shared-memory all-reduce" in survivor["error"]


@pytest.mark.slow
def test_a_rank_that_hangs_is_a_timeout_after_the_collective_timeout():
    survivor = _job(2, "hangs", timeout=60, extra={"TIMEOUT": "2"})[0]
    assert survivor.get("error") and "did not answer within" in survivor["error"], survivor
    assert 2 <= survivor["waited"] < 2 + 3 and "shared-memory all-reduce" in survivor["error"]


def test_off_switch_keeps_gloo(monkeypatch):
    from llmforge.runtime import host_collectives

    monkeypatch.setenv("LLMFORGE_SHM_COLLECTIVES", "0")
    assert not host_collectives.enabled()
