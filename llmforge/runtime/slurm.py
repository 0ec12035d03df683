"""`llmforge launch slurm`: an sbatch script that outlives its time limit. Torch-free.

Slurm ends a job at `--time`. The script asks Slurm for a SIGTERM `signal_margin` seconds
before that, on every process of the job step (`--signal=TERM@margin`, no `B:`): each node's
torchrun agent and each rank get it, so the ranks write their final checkpoint and exit 75
whatever torchrun does with its own copy. (`B:` would reach only the batch shell, and
passing it on to srun does not work: srun turns a SIGTERM it receives into a SIGKILL of its
tasks.) What the ranks recorded in the run dir (`llmforge status`) then decides what comes
next: a run that stopped for the time limit or a preemption, and saved a newer checkpoint
in this job, requeues its own job (`scontrol requeue`: the same job ID, the log appended,
nothing waiting in the queue meanwhile); a finished run ends; a failed one stops for a
person to look. The header says how many jobs the planned run needs at that limit.
"""

from __future__ import annotations

import math
import os
import re
import shlex
from pathlib import Path
from typing import Any

from llmforge.spec.errors import UserError

# Past the preemption deadline: torchrun's own wait (preempt_timeout + 30 s), then this script's
# status reads and its requeue. Slurm may send the signal up to 60 s early, which only helps.
MARGIN_AFTER_DEADLINE_S = 90
_TIME = re.compile(r"^(?:(?P<days>\d+)-)?(?P<a>\d+)(?::(?P<b>\d+))?(?::(?P<c>\d+))?$")

SBATCH_TEMPLATE = """#!/bin/bash
# Written by `llmforge launch slurm` for {spec}: {nnodes} node(s) × {nproc} GPU(s),
# TP {tp} × PP {pp} × DP {dp}. Submit with: sbatch {out}
{plan}
#
# Time limit: {margin} s before it, Slurm sends SIGTERM to every process of the job step (each
# node's torchrun agent and every rank: --signal=TERM@{margin}, no "B:"). The ranks write a final
# checkpoint within checkpoint.preempt_timeout ({preempt:g} s) and exit 75; the job then requeues
# itself (same job ID, this log appended) and the next start resumes from that checkpoint.
#SBATCH --job-name={name}
#SBATCH --nodes={nnodes}
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node={nproc}
#SBATCH --cpus-per-task={cpus}
#SBATCH --time={time}
#SBATCH --signal=TERM@{margin}
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output={name}-%j.out
{extra}
set -euo pipefail
RUN_DIR={run_dir}
llmforge() {{ python -m llmforge.cli "$@"; }}
head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_ADDR=$head_node MASTER_PORT={port}
# After a SIGTERM, torchrun waits this long for its ranks' final checkpoint before it kills them.
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT={shutdown}
before=$(llmforge status "$RUN_DIR" --field progress 2>/dev/null || true)
echo "llmforge: job $SLURM_JOB_ID (restart ${{SLURM_RESTART_COUNT:-0}}) starts from: ${{before:-a new run}}"
# One torchrun agent per node; agents meet at the c10d rendezvous on the head node. No --kill-on-bad-exit:
# after a SIGTERM every agent exits non-zero, and srun would kill the other nodes' ranks before rank 0
# records how the attempt ended; a lost node ends the others by parallelism.collective_timeout_s.
code=0
srun python -m torch.distributed.run \\
  --nnodes={nnodes} --nproc-per-node={nproc} \\
  --rdzv-backend=c10d --rdzv-id=$SLURM_JOB_ID --rdzv-endpoint=$head_node:{port} \\
  -m llmforge.cli run {spec_q}{overrides} --run-dir "$RUN_DIR" --resume-or-start || code=$?
# torchrun reports a SIGTERM as its own failure; what the ranks recorded says what comes next.
next=$(llmforge status "$RUN_DIR" --field next || true)
after=$(llmforge status "$RUN_DIR" --field progress || true)
case "$next" in
  done)
    echo "llmforge: every stage is done"
    exit 0 ;;
  resume)
    if [ "$after" = "$before" ]; then
      echo "llmforge: no new checkpoint in this job (at: $after); not requeued" >&2
      exit 1
    fi
    echo "llmforge: stopped at: $after (exit $code); requeueing job $SLURM_JOB_ID to go on"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0 ;;
  *)
    llmforge status "$RUN_DIR" >&2 || true
    exit $(( code == 0 ? 1 : code )) ;;
esac
"""


def parse_time(text: str) -> int:
    """Seconds of a Slurm time limit: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS."""
    m = _TIME.match(text.strip())
    if m is None:
        raise UserError(f"--time {text!r} is not a Slurm time limit",
                        "give minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS (e.g. --time 2-00:00:00); the script needs a limit")
    days = int(m["days"] or 0)
    parts = [int(p) for p in (m["a"], m["b"], m["c"]) if p is not None]
    if m["days"] is not None:  # D-HH[:MM[:SS]]
        hours, minutes, seconds = (parts + [0, 0])[:3]
    elif len(parts) == 3:
        hours, minutes, seconds = parts
    else:  # MM or MM:SS
        hours, (minutes, seconds) = 0, (parts + [0])[:2]
    total = ((days * 24 + hours) * 60 + minutes) * 60 + seconds
    if total <= 0:
        raise UserError(f"--time {text!r} is no time at all", "give the partition's limit, e.g. --time 48:00:00")
    return total


def _duration(seconds: float) -> str:
    return f"{seconds / 86400:.1f} days" if seconds >= 86400 else f"{seconds / 3600:.1f} h"


def plan_lines(plan: dict[str, Any], *, time: str, margin_s: int) -> list[str]:
    """The header's words on time: the planner's estimate per training stage, and the jobs it takes at this limit."""
    where = f"on {plan['device']['name']} at {plan['mfu']:.0%} MFU (`llmforge plan`)"
    if "note" in plan:
        return [f"# Planned time: unknown: {plan['note']}."]
    timed = [(s["name"], s.get("total_time_s"), s.get("note")) for s in plan["stages"] if "memory_per_rank" in s]
    known = math.fsum(t for _, t, _ in timed if t is not None)
    unknown = [f"{name} unknown ({note})" for name, t, note in timed if t is None]
    shown = ", ".join([f"{name} {_duration(t)}" for name, t, _ in timed if t is not None] + unknown) or "no training stage"
    per_job = parse_time(time) - margin_s
    jobs = max(1, math.ceil(known / per_job))
    lines = [f"# Planned training time {where}: {shown}."]
    at_least = "at least " if unknown else ""
    lines.append(f"# At --time={time} ({per_job / 3600:.1f} h of training per job, less start-up) that is {at_least}{jobs} "
                 f"job(s): this one and {at_least}{jobs - 1} requeue(s).")
    return lines


def write_slurm_script(spec, spec_path: str, overrides: list[str], out: Path, *, time: str, partition: str | None,
                       account: str | None, cpus_per_task: int, port: int, plan: dict[str, Any],
                       signal_margin: int | None = None) -> Path:
    """Write the sbatch script for `spec` (validated; `plan` is `build_plan`'s for the cluster's device)."""
    par = spec.parallelism
    limit_s = parse_time(time)
    preempt = spec.checkpoint.preempt_timeout
    shutdown = math.ceil(preempt) + 30
    margin = math.ceil(preempt) + MARGIN_AFTER_DEADLINE_S if signal_margin is None else signal_margin
    if margin < shutdown:
        raise UserError(f"--signal-margin {margin} s leaves the final checkpoint less than checkpoint.preempt_timeout "
                        f"{preempt:g} s plus torchrun's 30 s before the time limit",
                        f"give --signal-margin {shutdown + 30} or more, or lower checkpoint.preempt_timeout")
    if margin >= limit_s or margin > 65535:  # Slurm's sig_time is at most 65535
        raise UserError(f"--signal-margin {margin} s does not fit the time limit --time {time} ({limit_s} s)",
                        "give a longer --time, or a margin under it (at most 65535 s)")
    extra = "\n".join(line for line in (f"#SBATCH --partition={partition}" if partition else "",
                                         f"#SBATCH --account={account}" if account else "") if line)
    text = SBATCH_TEMPLATE.format(
        spec=spec_path, spec_q=shlex.quote(spec_path), out=out, name=spec.name, nnodes=par.nnodes, nproc=par.nproc_per_node,
        tp=par.tensor_model_parallel_size, pp=par.pipeline_model_parallel_size, dp=par.resolved_data_parallel_size(),
        cpus=cpus_per_task, time=time, extra=extra, port=port, margin=margin, preempt=preempt, shutdown=shutdown,
        run_dir=shlex.quote(spec.resolved_run_dir), plan="\n".join(plan_lines(plan, time=time, margin_s=margin)),
        overrides="".join(" " + shlex.quote(o) for o in overrides),
    )
    from llmforge.atomic import atomic_write_text

    atomic_write_text(out, text)
    os.chmod(out, 0o755)
    return out
