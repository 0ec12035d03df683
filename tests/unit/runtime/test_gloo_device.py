"""A one-process CPU run's gloo groups share one transport device (runtime.gloo_device, issue 31).

Each gloo device runs a loop thread that wakes every 10 ms; megatron makes ~20 groups, so
without sharing a one-process run keeps ~20 such threads polling. Run in a child process: the
test process may hold groups made before (other tests' layouts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads through /proc (Linux)")

ROOT = Path(__file__).resolve().parents[3]

CHILD = """
import json, os, sys, time
import torch, torch.distributed as dist

def loops():
    # A new thread names itself once it runs: read until the count holds still for 0.2 s.
    def count():
        return sum(open(f"/proc/self/task/{t}/comm").read().strip() == "gloo_tcp_loop" for t in os.listdir("/proc/self/task"))
    seen, deadline = [count()], time.monotonic() + 5
    while time.monotonic() < deadline and not (len(seen) >= 5 and len(set(seen[-5:])) == 1):
        time.sleep(0.05)
        seen.append(count())
    return seen[-1]

if sys.argv[1] == "torch":  # torch's own behaviour, for the comparison: one device per group
    dist.init_process_group("gloo", init_method="file://" + sys.argv[2], rank=0, world_size=1)
    for _ in range(5):
        dist.new_group([0], backend="gloo")
    print(json.dumps({"loops": loops()}))
    sys.exit(0)

from megatron.core import parallel_state as ps
from llmforge.runtime.distributed import init_distributed
from llmforge.spec.schema import ParallelismConfig

init_distributed(ParallelismConfig(), seed=1)
groups = len(ps._global_process_group_list) - 1
made = loops()
x = torch.ones(3)
dist.all_reduce(x, group=ps.get_data_parallel_group())
dist.all_reduce(x, group=ps.get_data_parallel_group_gloo())
dist.barrier(group=ps.get_tensor_model_parallel_group())
# megatron's groups destroyed (its gloo ones too) and made again, as for another stage's layout: still one device.
ps.destroy_model_parallel()
init_distributed(ParallelismConfig(), seed=1)
dist.all_reduce(x, group=ps.get_data_parallel_group())
print(json.dumps({"groups": groups, "loops": made, "after": loops(), "sum": x.tolist()}))
"""


def _child(*args: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "GLOO_SOCKET_IFNAME")}
    done = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env=env | {"PYTHONPATH": f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_one_process_runs_one_gloo_loop_thread_for_all_of_megatrons_groups(tmp_path):
    mine = _child("llmforge")
    assert mine["groups"] >= 10, mine  # megatron did make its groups
    assert mine["loops"] == 1 and mine["after"] == 1, mine
    assert mine["sum"] == [1.0, 1.0, 1.0]  # collectives on groups of one still work
    # torch's own way, which the test would not catch a regression of without this: a loop per group.
    assert _child("torch", str(tmp_path / "store"))["loops"] == 6
