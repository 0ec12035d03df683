"""init_distributed reads torchrun, srun or nothing; bad layouts fail with the fix named.

The slow tests start real jobs: two torchrun agents (`--nnodes 2`) on loopback, and two
processes with only srun's variables. This file is also their worker.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmforge.runtime.distributed import _first_slurm_host, check_world_size, read_launch_env, resolve_layout
from llmforge.spec.errors import UserError
from llmforge.spec.schema import ParallelismConfig


def test_torchrun_environment():
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", "MASTER_ADDR": "node7", "MASTER_PORT": "29512"}
    launch = read_launch_env(env)
    assert (launch.rank, launch.world_size, launch.local_rank, launch.local_world_size) == (3, 8, 1, 4)
    assert (launch.master_addr, launch.master_port, launch.launcher) == ("node7", 29512, "torchrun")


def test_srun_environment_without_torchrun():
    env = {
        "SLURM_PROCID": "5",
        "SLURM_NTASKS": "8",
        "SLURM_LOCALID": "1",
        "SLURM_NTASKS_PER_NODE": "4(x2)",
        "SLURM_JOB_NODELIST": "gpu[03-04],cpu1",
        "SLURM_JOB_ID": "123456",
    }
    launch = read_launch_env(env)
    assert (launch.rank, launch.world_size, launch.local_rank, launch.local_world_size) == (5, 8, 1, 4)
    assert (launch.master_addr, launch.launcher) == ("gpu03", "srun")
    assert launch.master_port == 20000 + 123456 % 20000
    # torchrun under srun: torchrun's variables win
    assert read_launch_env({**env, "RANK": "0", "WORLD_SIZE": "8"}).launcher == "torchrun"


@pytest.mark.parametrize("nodelist, first", [("node1", "node1"), ("gpu[07-09]", "gpu07"), ("a[3,5],b", "a3"), ("x-1,x-2", "x-1")])
def test_first_slurm_host(nodelist, first):
    assert _first_slurm_host(nodelist) == first


def test_no_launcher_is_one_process_on_a_free_port():
    launch = read_launch_env({})
    assert (launch.rank, launch.world_size, launch.master_addr, launch.launcher) == (0, 1, "127.0.0.1", "none")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", launch.master_port))  # still free


def test_unreadable_environment_names_the_variables():
    with pytest.raises(UserError, match="launcher's environment"):
        read_launch_env({"RANK": "zero", "WORLD_SIZE": "2"})


@pytest.mark.parametrize(
    "parallelism, world, words",
    [
        ({"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2}, 6, "world size 6 is not divisible by tensor_model_parallel_size 2"),
        ({"data_parallel_size": 4}, 2, "data_parallel_size is 4, but 2 processes"),
        ({"virtual_pipeline_model_parallel_size": 2}, 1, "needs pipeline_model_parallel_size > 1"),
        ({"sequence_parallel": True}, 2, "sequence_parallel needs tensor_model_parallel_size > 1"),
    ],
)
def test_layout_mismatches_are_user_errors(parallelism, world, words):
    with pytest.raises(UserError, match=words) as raised:
        resolve_layout(ParallelismConfig(**parallelism), world)
    assert raised.value.hint


def test_data_parallel_size_follows_the_world():
    assert resolve_layout(ParallelismConfig(tensor_model_parallel_size=2), 8) == 4
    assert resolve_layout(ParallelismConfig(data_parallel_size=2, pipeline_model_parallel_size=2), 4) == 2


def test_a_launch_of_another_size_names_both_and_the_overrides_that_fit_it():
    srun = read_launch_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_NTASKS_PER_NODE": "4(x2)", "SLURM_JOB_NODELIST": "gpu[1-2]"})
    check_world_size(ParallelismConfig(nnodes=2, nproc_per_node=4), srun)  # the spec's size: fine
    with pytest.raises(UserError) as raised:
        check_world_size(ParallelismConfig(nproc_per_node=4), srun)
    assert "srun started 8 processes (2 node(s) × 4)" in str(raised.value) and "= 4" in str(raised.value)
    assert "parallelism.nnodes=2" in raised.value.hint and "nproc_per_node=" not in raised.value.hint


# --- real jobs ---------------------------------------------------------------------------------


def worker(out: Path, mode: str) -> None:
    import torch
    import torch.distributed as dist

    from llmforge.runtime.distributed import init_distributed, shutdown

    parallelism = ParallelismConfig(tensor_model_parallel_size=2, collective_timeout_s=3)
    context = init_distributed(parallelism, seed=0)
    record = {
        "rank": context.rank,
        "world": context.world_size,
        "local_rank": context.local_rank,
        "tp": [context.tp_rank, context.tp_size],
        "dp": [context.dp_rank, context.dp_size],
        "threads": torch.get_num_threads(),
        "backend": context.backend,
    }
    total = torch.tensor([float(context.rank + 1)])
    dist.all_reduce(total)
    record["sum"] = total.item()
    if mode == "timeout":
        dist.barrier()
        if context.rank == 1:
            time.sleep(30)  # alive, but never joins the next collective
        else:
            start = time.monotonic()
            try:
                dist.all_reduce(torch.ones(1))
                record["timeout"] = None
            except RuntimeError as e:
                record["timeout"] = [time.monotonic() - start, str(e)[:200]]
            (out / f"rank{context.rank}.json").write_text(json.dumps(record))
            os._exit(0)
    (out / f"rank{context.rank}.json").write_text(json.dumps(record))
    shutdown()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env() -> dict[str, str]:
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS")
    return {**{k: v for k, v in os.environ.items() if k not in drop and not k.startswith("SLURM_")}, "PYTHONWARNINGS": "ignore"}


@pytest.mark.slow
def test_two_torchrun_agents_as_two_nodes_on_loopback(tmp_path):
    port = _free_port()
    agents = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1", f"--node-rank={node}",
             "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=llmforge-test",
             __file__, "--out", str(tmp_path), "--mode", "plain"],
            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for node in (0, 1)
    ]
    for agent in agents:
        output, _ = agent.communicate(timeout=240)
        assert agent.returncode == 0, output[-4000:]
    records = sorted((json.loads(p.read_text()) for p in tmp_path.glob("rank*.json")), key=lambda r: r["rank"])
    assert [r["rank"] for r in records] == [0, 1]
    for record in records:
        assert record["world"] == 2 and record["local_rank"] == 0 and record["sum"] == 3.0
        assert record["dp"] == [0, 1] and record["backend"] == "gloo"
    assert sorted(r["tp"][0] for r in records) == [0, 1]


@pytest.mark.slow
def test_srun_variables_alone_start_a_job_and_a_lost_rank_times_out(tmp_path):
    port = _free_port()
    procs = []
    for rank in (0, 1):
        env = {**_env(), "SLURM_PROCID": str(rank), "SLURM_NTASKS": "2", "SLURM_LOCALID": str(rank), "SLURM_NTASKS_PER_NODE": "2",
               "SLURM_JOB_NODELIST": "localhost", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, __file__, "--out", str(tmp_path), "--mode", "timeout"], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    output, _ = procs[0].communicate(timeout=240)
    assert procs[0].returncode == 0, output[-4000:]
    procs[1].kill()
    procs[1].communicate()
    record = json.loads((tmp_path / "rank0.json").read_text())
    assert record["world"] == 2 and record["sum"] == 3.0 and record["tp"] == [0, 2]
    # Two ranks on this node share its cores.
    assert record["threads"] == max(1, len(os.sched_getaffinity(0)) // 2)
    elapsed, message = record["timeout"]
    assert 2 <= elapsed < 20, message  # collective_timeout_s = 3: the survivor fails instead of hanging


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--mode", choices=["plain", "timeout"], required=True)
    args = parser.parse_args()
    worker(args.out, args.mode)


def test_busy_machine_warning_only_when_threads_would_contend():
    from llmforge.runtime.distributed import busy_machine_warning

    warning = busy_machine_warning(2, 2, "", load=3.5)
    assert warning and "OMP_NUM_THREADS=1" in warning and "3.5 on 2 cores" in warning
    assert busy_machine_warning(2, 2, "", load=0.8) is None  # the cores are free
    assert busy_machine_warning(2, 2, "2", load=9.0) is None  # the user chose the thread count
    assert busy_machine_warning(2, 1, "", load=9.0) is None  # one thread has no team to wait for
