"""Named fault-injection points for the reliability suite (tests/fault/).

`LLMFORGE_FAULT=<point>[@<n>][:<action>]` acts the n-th time (default first) this process
reaches `<point>` (several, comma-separated, act each at its own point): `kill` (SIGKILL, the
default), `hang` (SIGSTOP: alive, silent, as a wedged rank is) or `stall[=<s>]` (the calling
thread alone sleeps, for good or for s seconds, as a write stuck on a dead or slow disk does,
while a save in the background lets the training thread go on).
`LLMFORGE_FAULT_RANK=<r>` limits it to one rank of a job. The points:
`ckpt_after_shard`, `ckpt_before_rename`, `ckpt_before_marker` (checkpoint.py; in the writer
thread for a save in the background),
`train_step` (after each step's update, train.py), `evaluate` (after an eval step's checkpoint, before
its evaluation, train.py), `step_before_reduce` (inside a step,
before the ranks agree on its loss, step.py).

`LLMFORGE_FAULT_NAN_STEP=<s>` multiplies the training loss of step s by NaN, and
`LLMFORGE_FAULT_SPIKE_STEP=<s>` by 100, before the backward pass, so that the guards see
what a real bad batch produces. Unset, a fault point costs one dict lookup.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from typing import Any

_COUNTS: dict[str, int] = {}
_ACTIONS = {"kill": signal.SIGKILL, "hang": signal.SIGSTOP}
SPIKE_FACTOR = 100.0


def _this_rank() -> bool:
    wanted = os.environ.get("LLMFORGE_FAULT_RANK")
    return wanted is None or wanted == os.environ.get("RANK", "0")


def fault_point(name: str) -> None:
    faults = os.environ.get("LLMFORGE_FAULT")
    if not faults or name not in faults or not _this_rank():
        return
    counted = False
    for spec in faults.split(","):
        spec, _, action = spec.partition(":")
        point, _, nth = spec.partition("@")
        if point != name:
            continue
        if not counted:  # one count per visit, however many faults name the point
            _COUNTS[name] = _COUNTS.get(name, 0) + 1
            counted = True
        if _COUNTS[name] != int(nth or 1):
            continue
        action, _, seconds = action.partition("=")
        if action == "stall":
            threading.Event().wait(float(seconds) if seconds else None)
            continue
        os.kill(os.getpid(), _ACTIONS[action or "kill"])


def loss_faults() -> dict[int, float]:
    """{step: factor} for the loss multipliers asked for in the environment."""
    out: dict[int, float] = {}
    for env, factor in (("LLMFORGE_FAULT_SPIKE_STEP", SPIKE_FACTOR), ("LLMFORGE_FAULT_NAN_STEP", float("nan"))):
        if os.environ.get(env):
            out[int(os.environ[env])] = factor
    return out


def install_loss_faults(chunk: Any, current_step: Callable[[], int]) -> bool:
    """Multiply the per-token loss that `chunk` (the last pipeline stage's) returns in training.

    Returns whether a fault was installed. Evaluation runs with the chunk in eval mode and
    is never touched.
    """
    faults = loss_faults()
    if not faults:
        return False

    def hook(module, _inputs, output):
        factor = faults.get(current_step())
        if factor is None or not module.training:
            return None
        return output * factor

    chunk.register_forward_hook(hook)
    return True
