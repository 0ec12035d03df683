"""The sbatch script's signal path on loopback (issue 33): two torchrun agents as two nodes, Slurm's SIGTERM, the requeue.

The script `llmforge launch slurm` writes runs as it is, under bash, with stand-ins for the two
Slurm commands it calls: `srun` starts one task per node (here: two torchrun agents on one
machine, meeting at their c10d rendezvous on 127.0.0.1) and passes on their highest exit code;
`scontrol` names the head node and records a requeue. Slurm's `--signal=TERM@margin` (no `B:`)
signals every process of the job step, not the batch shell: the test does the same, to both
agents and both ranks at once, while the ranks are paused after step 23.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmforge.cli import main
from llmforge.runtime.status import run_status
from tests.fault.harness import clean_env, free_port, losses, steps_saved

pytestmark = pytest.mark.slow

SRUN = """#!{python}
# srun on one machine: one task per node, each in its own session as slurmstepd starts them; with
# --kill-on-bad-exit=1 a failed task's siblings are killed, descendants first (slurmstepd kills the step's cgroup).
import os, signal, subprocess, sys, time
args = sys.argv[1:]
kill_on_bad_exit = "--kill-on-bad-exit=1" in args
while args[0].startswith("--"):
    args.pop(0)
tasks = [subprocess.Popen(args, env=dict(os.environ, SLURM_NODEID=str(n), SLURM_PROCID=str(n), SLURM_LOCALID="0"),
                          start_new_session=True) for n in range(int(os.environ["SLURM_NNODES"]))]
with open(os.path.join(os.environ["FAKE_SLURM_DIR"], "tasks"), "w") as f:
    f.write(" ".join(str(t.pid) for t in tasks))
def descendants(pid):
    try:
        children = [int(c) for c in open(f"/proc/{{pid}}/task/{{pid}}/children").read().split()]
    except OSError:
        return []
    return [d for c in children for d in descendants(c)] + children
while any(t.poll() is None for t in tasks):
    if kill_on_bad_exit and any(t.poll() not in (None, 0) for t in tasks):
        for t in tasks:
            for pid in descendants(t.pid) + [t.pid]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
    time.sleep(0.05)
codes = [t.returncode for t in tasks]
with open(os.path.join(os.environ["FAKE_SLURM_DIR"], "task_codes"), "a") as f:
    f.write(" ".join(map(str, codes)) + "\\n")
sys.exit(max(128 - c if c < 0 else c for c in codes))
"""

SCONTROL = """#!/bin/bash
case "$1" in
  show) echo 127.0.0.1 ;;
  requeue) echo "$2" >> "$FAKE_SLURM_DIR/requeued" ;;
  *) echo "scontrol stand-in: $*" >&2; exit 1 ;;
esac
"""


def _descendants(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children")
    direct = [int(c) for c in children.read_text().split()] if children.exists() else []
    return direct + [d for c in direct for d in _descendants(c)]


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


@pytest.fixture
def cluster(tmp_path) -> tuple[Path, dict[str, str]]:
    """A job's submit dir and environment, with the stand-ins for srun and scontrol first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(SRUN.format(python=sys.executable))
    (bin_dir / "scontrol").write_text(SCONTROL)
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).chmod(0o755)
    env = clean_env() | {"PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}", "FAKE_SLURM_DIR": str(tmp_path),
                         "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_NNODES": "2", "OMP_NUM_THREADS": "1"}
    return tmp_path, env


def test_slurms_sigterm_reaches_every_rank_the_job_requeues_and_the_next_job_finishes(cluster, spec, reference, capsys):
    submit, env = cluster
    script = submit / "job.sbatch"
    assert main(["launch", "slurm", str(spec), "parallelism.nnodes=2", "parallelism.nproc_per_node=1", "checkpoint.preempt_timeout=60",
                 "-o", str(script), "--time", "30", "--port", str(free_port()), "--gpu", "cpu"]) == 0
    capsys.readouterr()
    text = script.read_text()
    assert "#SBATCH --signal=TERM@150" in text and "#SBATCH --requeue" in text and "TORCH_ELASTIC_SHUTDOWN_TIMEOUT=90" in text

    job = subprocess.Popen(["bash", str(script)], cwd=submit, env=env | {"LLMFORGE_FAULT": "train_step@23:hang"},
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline:  # both ranks paused after step 23, each under its node's agent
            tasks = submit / "tasks"  # the torchrun agents, as the srun stand-in started them
            step = [int(p) for p in tasks.read_text().split()] if tasks.exists() else []
            ranks = [r for agent in step for r in _descendants(agent)]
            if len(step) == 2 and len(ranks) == 2 and [_state(r) for r in ranks] == ["T", "T"]:
                break
            time.sleep(0.2)
        else:
            raise TimeoutError("the ranks did not pause")
        for pid in step + ranks:  # --signal=TERM@margin: every process of the step, the batch shell not
            os.kill(pid, signal.SIGTERM)
        time.sleep(1)
        for rank in ranks:
            os.kill(rank, signal.SIGCONT)
        out, _ = job.communicate(timeout=300)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    run = submit / "runs" / "fault"
    assert job.returncode == 0, out[-6000:]
    assert (submit / "requeued").read_text() == "4242\n"  # the job requeued itself
    final = steps_saved(run)[-1]
    assert final in (23, 24) and steps_saved(run) == [20, final]  # both ranks saved the same step together
    attempt = run_status(run)["last_attempt"]
    assert (attempt["reason"], attempt["code"]) == ("preempted", 75)  # the ranks' exit 75, recorded by rank 0
    # torchrun reports the signal as its own failure (why the script reads the run dir, not the exit code); nothing was killed.
    codes = [int(c) for c in (submit / "task_codes").read_text().split()]
    assert len(codes) == 2 and all(c > 0 for c in codes), codes
    assert f"llmforge: stopped at: prepare=done pretrain={final}" in out and "requeueing job 4242 to go on" in out

    # The requeued job: the same script, Slurm counting the restart.
    again = subprocess.run(["bash", str(script)], cwd=submit, env=env | {"SLURM_RESTART_COUNT": "1"}, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, (again.stdout + again.stderr)[-6000:]
    assert f"(restart 1) starts from: prepare=done pretrain={final}" in again.stdout and "every stage is done" in again.stdout
    assert (submit / "requeued").read_text() == "4242\n"  # not requeued again
    want, got = losses(reference), losses(run)
    assert list(got) == list(range(1, 41))
    for step in range(final + 1, 41):  # two ranks sum in another order than one: ~1e-7 apart
        assert got[step] == pytest.approx(want[step], rel=1e-5), step
