"""The layout `llmforge run` picks on its own for a small model on a CPU machine: one process per core.

Why: at a small model's shapes a matrix multiply split over two threads runs well short of
twice as fast, and every small op pays OpenMP's fork and join; two processes of one thread
each, each on half of every micro batch, keep both cores busy on whole matrices. Measured on
this project's 2-core machine (docs/performance.md, issue 31), shakespeare-char's step: one
process × 2 threads ~48 ms, two processes × 1 thread 37-40 ms with the gradients summed
through shared memory (`runtime.host_collectives`; over gloo's loopback TCP 43-55 ms); at
10.7M parameters the two layouts ran alike (1.00-1.04).

It applies only where the spec leaves the layout to llmforge (no layout field in
`parallelism`, no `--nproc-per-node`), the run is on CPU, every training stage is a
pretraining stage whose micro batch splits evenly, the model is small (where it was
measured), and the spec validates at that layout. It is the layout the user could have
written: `parallelism.nproc_per_node = N` and each stage's `micro_batch_size / N` (the
optimizer batch, the samples each step reads and their order stay the same; the losses are
the same to the last bit at N = 2). The run says so at start; `parallelism.nproc_per_node: 1`
keeps one process, `LLMFORGE_AUTO_LAYOUT=0` every run's (the test suite sets it, and its own
tests of this layout unset it). A resumed run keeps the layout it started with. Torch-free: `plan` calls it too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from llmforge.runtime import launch

# Fields of `parallelism` that choose a layout: a spec that sets any of them chose its own.
LAYOUT_FIELDS = ("tensor_model_parallel_size", "pipeline_model_parallel_size", "virtual_pipeline_model_parallel_size",
                 "data_parallel_size", "expert_model_parallel_size", "expert_tensor_parallel_size", "nnodes", "nproc_per_node",
                 "use_distributed_optimizer", "sequence_parallel")
# Measured (docs/performance.md): 0.8M parameters (shakespeare-char) ~1.2x one process's tokens/s
# on 2 threads, 10.7M (nanoGPT's GPU shape, 6 x 384, seq 256) 1.00-1.04x; larger is not chosen.
MAX_PARAMETERS = 12_000_000
# Processes it picks at most: two is what was measured; on a machine with more cores each takes
# its share of them as threads (the relaunch sets OMP_NUM_THREADS), as when the user asks for two.
MAX_PROCESSES = 2


@dataclass(frozen=True)
class AutoLayout:
    processes: int
    overrides: tuple[str, ...]
    note: str


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _parameters(spec) -> int | None:
    try:
        from llmforge.models.size import param_count

        return param_count(spec.model)
    except Exception:  # a model the size module cannot count (not a GPT shape): not chosen
        return None


def choose(spec, data: dict, *, cores: int | None = None, recorded: dict | None = None) -> AutoLayout | None:
    """The layout to run `spec` at on this CPU machine, or None to keep the spec's one process.

    `data`: the resolved spec as the user wrote it (which layout fields it sets); `recorded`:
    the resolved spec a resumed run started with (its layout is kept).
    """
    if os.environ.get("LLMFORGE_AUTO_LAYOUT") == "0":
        return None
    if any(key in (data.get("parallelism") or {}) for key in LAYOUT_FIELDS):
        return None
    trained = [(i, stage) for i, stage in enumerate(spec.stages) if getattr(stage, "train", None) is not None]
    if not trained or any(stage.type != "pretrain" for _, stage in trained):
        return None
    parameters = _parameters(spec)
    if parameters is None or parameters > MAX_PARAMETERS:
        return None
    if recorded is not None:  # a resumed run: the layout it started with, whatever this machine would pick now
        processes = int((recorded.get("parallelism") or {}).get("nproc_per_node", 1))
    else:
        # One thread a process unless OMP_NUM_THREADS asks for more: that many processes fit the cores.
        processes = min(MAX_PROCESSES, (cores or usable_cores()) // launch.rank_threads(1, cores=1))
    micro = [stage.train.micro_batch_size for _, stage in trained]
    while processes > 1 and any(m % processes for m in micro):
        processes -= 1
    if processes <= 1:
        return None
    overrides = [f"parallelism.nproc_per_node={processes}"]
    overrides += [f"stages.{i}.train.micro_batch_size={m // processes}" for (i, _), m in zip(trained, micro)]
    batches = ", ".join(f"{m // processes} of {m}" for m in micro)
    threads = launch.rank_threads(processes, cores=cores)  # what the relaunch will give each
    note = (f"CPU layout: {processes} processes × {threads} thread{'s' if threads > 1 else ''}, data parallel (micro batch {batches} per "
            f"process, the same samples per step): faster than one process on these cores for a model of "
            f"{parameters / 1e6:.1f}M parameters; parallelism.nproc_per_node=1 keeps one process (LLMFORGE_AUTO_LAYOUT=0 for every run)")
    return AutoLayout(processes, tuple(overrides), note)
