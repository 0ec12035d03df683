"""torch.distributed and megatron parallel_state from the launcher's environment.

Works under torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), under a bare srun
(SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_JOB_NODELIST), and with no launcher at
all (one process on 127.0.0.1 and a free port). gloo on CPU, nccl on GPU.
"""

from __future__ import annotations

import datetime
import os
import re
import socket
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

from llmforge.spec.errors import UserError

if TYPE_CHECKING:
    import torch

    from llmforge.spec.schema import ParallelismConfig


@dataclass(frozen=True)
class ParallelContext:
    """Where this process sits in the job and in the TP × PP × DP layout."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int
    dp_rank: int
    dp_size: int
    vpp_size: int | None
    device: torch.device
    backend: str

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: str


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _first_slurm_host(nodelist: str) -> str:
    """'gpu[03-05,07],cpu1' → 'gpu03' (the first host, without needing `scontrol`)."""
    match = re.match(r"([^,\[]+)(?:\[([^\],]+))?", nodelist)
    if not match:
        raise UserError(f"cannot read SLURM_JOB_NODELIST {nodelist!r}", hint="set MASTER_ADDR to the first node's address")
    prefix, ranges = match.groups()
    return prefix + ranges.split("-")[0] if ranges else prefix


def _slurm_tasks_per_node(value: str | None, world_size: int, nnodes: str | None) -> int:
    if value:  # '4' or '4(x2)': the first node's count
        return int(re.match(r"\d+", value).group())
    return max(1, world_size // int(nnodes or 1))


def read_launch_env(environ: dict[str, str] | None = None) -> LaunchEnv:
    """The launcher's view of this process: torchrun first, then srun, else a single process."""
    env = os.environ if environ is None else environ
    try:
        if "RANK" in env and "WORLD_SIZE" in env:
            world_size = int(env["WORLD_SIZE"])
            return LaunchEnv(
                rank=int(env["RANK"]),
                world_size=world_size,
                local_rank=int(env.get("LOCAL_RANK", 0)),
                local_world_size=int(env.get("LOCAL_WORLD_SIZE", world_size)),
                master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
                master_port=int(env.get("MASTER_PORT", 29500)),
                launcher="torchrun",
            )
        if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
            world_size = int(env["SLURM_NTASKS"])
            return LaunchEnv(
                rank=int(env["SLURM_PROCID"]),
                world_size=world_size,
                local_rank=int(env.get("SLURM_LOCALID", 0)),
                local_world_size=_slurm_tasks_per_node(env.get("SLURM_NTASKS_PER_NODE"), world_size, env.get("SLURM_NNODES")),
                master_addr=env.get("MASTER_ADDR") or _first_slurm_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1")),
                # A job-specific default port, so that two jobs sharing a node do not collide.
                master_port=int(env.get("MASTER_PORT", 20000 + int(env.get("SLURM_JOB_ID", 0)) % 20000)),
                launcher="srun",
            )
    except ValueError as e:
        raise UserError(f"cannot read the launcher's environment: {e}", hint="check RANK, WORLD_SIZE, LOCAL_RANK and MASTER_PORT") from None
    return LaunchEnv(0, 1, 0, 1, "127.0.0.1", _free_port(), "none")


def check_world_size(parallelism: ParallelismConfig, launch: LaunchEnv) -> None:
    """Refuse a launch whose process count is not the spec's nnodes × nproc_per_node.

    Under the user's own torchrun or srun the runtime would take DP from the processes it
    got, while validate's checks and the plan worked from the spec's numbers.
    """
    if launch.world_size == parallelism.world_size:
        return
    per_node = launch.local_world_size
    if not per_node or launch.world_size % per_node:  # an uneven srun layout: count it as one node
        per_node = launch.world_size
    nodes = launch.world_size // per_node
    fix = [f"parallelism.{key}={value}" for key, value, spec_value in
           (("nnodes", nodes, parallelism.nnodes), ("nproc_per_node", per_node, parallelism.nproc_per_node)) if value != spec_value]
    raise UserError(
        f"{launch.launcher} started {launch.world_size} processes ({nodes} node(s) × {per_node}), but the spec's layout is "
        f"parallelism.nnodes {parallelism.nnodes} × parallelism.nproc_per_node {parallelism.nproc_per_node} = {parallelism.world_size}",
        hint=f"override {' '.join(fix)} (what the launch gives), or launch {parallelism.world_size} "
             f"process{'es' if parallelism.world_size != 1 else ''}",
    )


def resolve_layout(parallelism: ParallelismConfig, world_size: int) -> int:
    """The data-parallel size for this world size, or a UserError naming the mismatch."""
    tp = parallelism.tensor_model_parallel_size
    pp = parallelism.pipeline_model_parallel_size
    model_parallel = tp * pp
    if world_size % model_parallel:
        raise UserError(
            f"world size {world_size} is not divisible by tensor_model_parallel_size {tp} × pipeline_model_parallel_size {pp}",
            hint=f"launch a multiple of {model_parallel} processes, or change parallelism",
        )
    dp = world_size // model_parallel
    if parallelism.data_parallel_size != "auto" and parallelism.data_parallel_size != dp:
        raise UserError(
            f"parallelism.data_parallel_size is {parallelism.data_parallel_size}, but {world_size} processes "
            f"with TP {tp} × PP {pp} give {dp} data-parallel replicas",
            hint=f"launch {parallelism.data_parallel_size * model_parallel} processes, or set data_parallel_size: auto",
        )
    vpp = parallelism.virtual_pipeline_model_parallel_size
    if vpp is not None and pp == 1:
        raise UserError("parallelism.virtual_pipeline_model_parallel_size needs pipeline_model_parallel_size > 1", hint="remove it, or raise the pipeline size")
    if parallelism.sequence_parallel and tp == 1:
        raise UserError("parallelism.sequence_parallel needs tensor_model_parallel_size > 1", hint="turn it off, or raise the tensor-parallel size")
    experts = parallelism.expert_tensor_parallel * parallelism.expert_model_parallel_size * pp
    if world_size % experts:
        raise UserError(
            f"world size {world_size} is not divisible by expert tensor × expert × pipeline parallel = {experts}",
            hint="the experts are laid out over ETP × EP × expert-DP × PP: launch a multiple of that, or lower expert_model_parallel_size",
        )
    return dp


def _layout_key(parallelism: ParallelismConfig) -> tuple:
    return (
        parallelism.tensor_model_parallel_size,
        parallelism.pipeline_model_parallel_size,
        parallelism.virtual_pipeline_model_parallel_size,
        parallelism.expert_model_parallel_size,
        parallelism.expert_tensor_parallel,
    )


_state: dict[str, object] = {}


def busy_machine_warning(cores: int, threads: int, omp_env: str, load: float | None = None) -> str | None:
    """A warning when torch will run a multi-thread team on cores other processes already keep busy.

    Each op ends only when every thread of its team has run, so a team of 2 on 2 busy cores
    waits for time slices at every op: measured 20-30x slower steps on the 2-core dev machine.
    Silent when the user chose the thread count (OMP_NUM_THREADS) or the cores are free.
    """
    if omp_env or threads <= 1:
        return None
    if load is None:
        try:
            load = os.getloadavg()[0]
        except (OSError, AttributeError):
            return None
    if load < cores:
        return None
    return (f"warning: this machine is busy (1-minute load average {load:.1f} on {cores} cores) and torch will use "
            f"{threads} threads per process; a thread team on busy cores can make every step many times slower. "
            "On a shared machine set OMP_NUM_THREADS=1 (llmforge honours it).")


def init_distributed(parallelism: ParallelismConfig, *, seed: int, timeout_s: float | None = None) -> ParallelContext:
    """Initialize torch.distributed (once per process) and megatron's parallel state for `parallelism`.

    Calling it again with another layout re-creates megatron's groups on the same process
    group (successive stages, tests). Seeds megatron's RNG trackers with its offsets, and
    installs the CPU compatibility layer when there is no CUDA.
    """
    import torch
    import torch.distributed as dist

    launch = read_launch_env()
    dp = resolve_layout(parallelism, launch.world_size)
    timeout = datetime.timedelta(seconds=timeout_s or parallelism.collective_timeout_s)
    on_gpu = torch.cuda.is_available()

    if not on_gpu:
        from llmforge.models import cpu_compat
        from llmforge.runtime import host_malloc

        cpu_compat.install()
        # Before the model and its first step allocate: no page faults per step (host_malloc).
        host_malloc.keep_freed_memory()
    # Each rank on a node gets its share of the cores (2 ranks on 2 cores: 1 thread each),
    # unless OMP_NUM_THREADS says otherwise: on a shared machine, spinning OpenMP threads
    # that find no free core cost ten times the work.
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = os.environ.get("OMP_NUM_THREADS", "")
    torch.set_num_threads(int(threads) if threads.isdigit() and int(threads) > 0 else max(1, cores // launch.local_world_size))
    if not on_gpu and launch.local_rank == 0 and (warning := busy_machine_warning(cores, torch.get_num_threads(), threads)):
        print(warning, file=sys.stderr, flush=True)

    if on_gpu:
        torch.cuda.set_device(launch.local_rank)
        device, backend = torch.device("cuda", launch.local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"

    if not dist.is_initialized():
        from llmforge.runtime import host_collectives

        if backend == "gloo" and (launch.world_size == 1 or (launch.local_world_size == launch.world_size and host_collectives.enabled())):
            from llmforge.runtime.gloo_device import share_one_device

            # megatron's ~21 groups: one polling loop thread, not 21. With several ranks on one
            # host the gradients go through shared memory (host_collectives), so gloo's groups
            # carry only small calls and need no loop thread each.
            share_one_device()
        dist.init_process_group(
            backend=backend,
            init_method=f"tcp://{launch.master_addr}:{launch.master_port}",
            rank=launch.rank,
            world_size=launch.world_size,
            timeout=timeout,
        )
        _state["owns_process_group"] = True

    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized() and _state.get("layout") != _layout_key(parallelism):
        parallel_state.destroy_model_parallel()
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=parallelism.tensor_model_parallel_size,
            pipeline_model_parallel_size=parallelism.pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=parallelism.virtual_pipeline_model_parallel_size,
            expert_model_parallel_size=parallelism.expert_model_parallel_size,
            expert_tensor_parallel_size=parallelism.expert_tensor_parallel,
            # megatron takes minutes but builds a timedelta from them, so seconds survive as a fraction.
            distributed_timeout_minutes=timeout.total_seconds() / 60,
        )
        _state["layout"] = _layout_key(parallelism)
        if not on_gpu and launch.world_size > 1:
            _attach_host_groups(launch, timeout.total_seconds())

    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    seed_everything(seed, tp_rank=tp_rank, pp_rank=pp_rank)
    return ParallelContext(
        rank=launch.rank,
        world_size=launch.world_size,
        local_rank=launch.local_rank,
        local_world_size=launch.local_world_size,
        tp_rank=tp_rank,
        tp_size=parallelism.tensor_model_parallel_size,
        pp_rank=pp_rank,
        pp_size=parallelism.pipeline_model_parallel_size,
        dp_rank=parallel_state.get_data_parallel_rank(),
        dp_size=dp,
        vpp_size=parallelism.virtual_pipeline_model_parallel_size,
        device=device,
        backend=backend,
    )


def _attach_host_groups(launch: LaunchEnv, timeout_s: float) -> None:
    """Shared-memory all-reduces (runtime.host_collectives) for the world and the DP groups, when every rank is on this host."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from llmforge.runtime import host_collectives

    host_collectives.forget_groups()  # megatron's groups were (re)made: their objects are new
    if launch.local_world_size != launch.world_size:
        return  # ranks on several hosts: gloo between them
    for group in (dist.group.WORLD, parallel_state.get_data_parallel_group(),
                  parallel_state.get_data_parallel_group(with_context_parallel=True)):
        host_collectives.attach(group, timeout_s=timeout_s)


def seed_everything(seed: int, *, tp_rank: int, pp_rank: int) -> None:
    """megatron's seeding: the default stream per pipeline stage, plus the TP-aware tracker.

    The default generator must draw the same numbers on every TP rank (their activations
    are replicated), so data code keeps its own `torch.Generator`.
    """
    import torch

    torch.manual_seed(seed + 100 * pp_rank)
    if torch.cuda.is_available():
        from megatron.core import tensor_parallel

        tensor_parallel.model_parallel_cuda_manual_seed(seed + 100 * pp_rank)
    else:
        from megatron.core import parallel_state

        from llmforge.models import cpu_compat

        cpu_compat.seed_cpu_rng_tracker(seed + 100 * pp_rank, tp_rank, parallel_state.get_expert_model_parallel_rank(),
                                        parallel_state.get_expert_tensor_parallel_rank())


_LOST_PEER = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Timed out", "timed out", "Connection refused")


def collective_failure(error: BaseException, *, timeout_s: float) -> str | None:
    """A clear message when `error` is a collective that lost its peer (died or hung), else None."""
    import torch.distributed as dist

    text = str(error)
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return None  # one process has no peer to lose
    if not (isinstance(error, dist.DistError) or (isinstance(error, RuntimeError) and any(s in text for s in _LOST_PEER))):
        return None
    if "imed out" in text:
        what = f"did not answer within parallelism.collective_timeout_s ({timeout_s:g} s) during a collective: it hung, or its network failed"
    else:
        what = "closed its connection during a collective: it died, or its network failed"
    first = text.strip().splitlines()[0][:300] if text.strip() else type(error).__name__
    return (f"lost contact with another rank, which {what} ({first}). "
            "This rank stops instead of waiting; --resume continues from the newest complete checkpoint")


def shutdown() -> None:
    """Tear down megatron's groups and, if we created it, the process group."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    _state.pop("layout", None)
    from llmforge.runtime import host_collectives

    host_collectives.forget_groups()
    if _state.pop("owns_process_group", False) and dist.is_initialized():
        dist.destroy_process_group()
