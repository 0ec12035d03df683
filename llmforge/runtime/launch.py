"""Process launch: relaunch under torchrun, detect an outside launcher (sbatch scripts: runtime/slurm.py).

`llmforge run` with more than one process per node relaunches itself under torchrun (the
real elastic launcher); started by the user's own torchrun or srun, it reads the
environment instead. The layout is checked against the machine before any process starts.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys

from llmforge.spec.errors import UserError

READY_ENV = "LLMFORGE_RUNDIR_READY"  # the launcher already applied the run-dir rules
RESUMING_ENV = "LLMFORGE_RESUMING"


def under_launcher() -> bool:
    """True inside torchrun (or srun with torchrun-style variables)."""
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)


def _cpu_only_torch() -> bool:
    """True when the installed torch is built for no accelerator, read from its `version.py` without importing it.

    `llmforge run` with several processes checks the layout in a parent that only launches
    them; importing torch there (~2 s on a small CPU machine) came before every rank's start.
    """
    import importlib.util
    import re
    from pathlib import Path

    try:
        found = importlib.util.find_spec("torch")
        text = (Path(next(iter(found.submodule_search_locations))) / "version.py").read_text()
    except Exception:
        return False  # unknown: ask torch itself
    builds = re.findall(r"^(cuda|hip|xpu)\s*(?::[^=]*)?=\s*(.+?)\s*$", text, flags=re.M)
    return len(builds) == 3 and all(value == "None" for _, value in builds)


def local_devices() -> tuple[str, int]:
    """(kind, count) of what this machine can give ranks: GPUs, else CPU cores."""
    if _cpu_only_torch():
        return "CPU core", os.cpu_count() or 1
    try:
        import torch

        if torch.cuda.is_available():
            return "GPU", torch.cuda.device_count()
    except ImportError:
        pass
    return "CPU core", os.cpu_count() or 1


def check_devices(parallelism, *, multi_node_flags: bool) -> None:
    """Refuse a layout this machine cannot run, before any process starts."""
    kind, have = local_devices()
    need = parallelism.nproc_per_node
    if parallelism.nnodes > 1 and not multi_node_flags and not under_launcher():
        raise UserError(
            f"the layout needs {parallelism.world_size} processes on {parallelism.nnodes} nodes × {need}; this is one machine",
            "on a cluster run `llmforge launch slurm SPEC` or pass --nnodes/--node-rank/--rdzv-endpoint on each node; "
            "`llmforge plan SPEC` shows what the layout costs",
        )
    if need > have:
        raise UserError(
            f"the layout needs {need} processes per node (tensor {parallelism.tensor_model_parallel_size} × pipeline "
            f"{parallelism.pipeline_model_parallel_size} × data {parallelism.resolved_data_parallel_size()} over "
            f"{parallelism.nnodes} node(s)), but this machine has {have} {kind}{'s' if have != 1 else ''}",
            "shrink the layout with overrides (e.g. parallelism.nproc_per_node=1 parallelism.tensor_model_parallel_size=1), "
            "or see `llmforge plan SPEC` for what it needs",
        )


def rank_threads(nproc: int, cores: int | None = None) -> int:
    """Threads each of `nproc` ranks on this machine runs: OMP_NUM_THREADS if set, else its share of the cores."""
    value = os.environ.get("OMP_NUM_THREADS", "")
    if value.isdigit() and int(value) > 0:
        return int(value)
    return max(1, (cores or os.cpu_count() or 1) // nproc)


def torchrun_argv(argv: list[str], *, nproc: int, nnodes: int, node_rank: int | None, rdzv_endpoint: str | None) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--nnodes={nnodes}"]
    if nnodes > 1:
        if not rdzv_endpoint:
            raise UserError("a multi-node run needs --rdzv-endpoint HOST:PORT (the same on every node)")
        cmd += ["--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}"]
        if node_rank is not None:
            cmd.append(f"--node-rank={node_rank}")
    else:
        cmd.append("--standalone")
    return [*cmd, "-m", "llmforge.cli", *argv]


def relaunch(argv: list[str], *, nproc: int, nnodes: int, node_rank: int | None, rdzv_endpoint: str | None, resuming: bool,
             preempt_timeout: float = 120.0, extra_env: dict[str, str] | None = None) -> int:
    """Run this command again under torchrun and return its exit code.

    SIGTERM is passed on to torchrun, which passes it to the ranks; they write a final
    checkpoint and the result is EXIT_PREEMPTED. torchrun is told to wait for them that
    long (its own default SIGKILLs them after 30 s).
    """
    from llmforge.runtime.train import EXIT_PREEMPTED

    env = {**os.environ, **(extra_env or {})}
    env[READY_ENV] = "1"
    env[RESUMING_ENV] = "1" if resuming else "0"
    env.setdefault("OMP_NUM_THREADS", str(rank_threads(nproc)))
    env.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(math.ceil(preempt_timeout) + 30))
    cmd = torchrun_argv(argv, nproc=nproc, nnodes=nnodes, node_rank=node_rank, rdzv_endpoint=rdzv_endpoint)
    proc = subprocess.Popen(cmd, env=env)
    terminated: list[int] = []

    def forward(signum: int, _frame) -> None:
        terminated.append(signum)
        proc.send_signal(signum)

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        code = proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        code = proc.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)
    # torchrun reports a signal as its own failure; the ranks' checkpoints make it a resumable stop.
    return EXIT_PREEMPTED if terminated and code != 0 else code
