"""Learning-rate schedules: factories `(options, *, peak_lr, total_steps) -> (step -> lr)`.

`step` counts optimizer steps from 0; warmup rises linearly to the optimizer's lr so that
step 0 already trains (as Megatron and nanoGPT do: lr * (step + 1) / warmup).
"""

from __future__ import annotations

import math
from collections.abc import Callable

Schedule = Callable[[int], float]


def _warmup(options, peak_lr: float, step: int) -> float | None:
    if step < options.warmup_steps:
        return peak_lr * (step + 1) / options.warmup_steps
    return None


def build_constant(options, *, peak_lr: float, total_steps: int) -> Schedule:
    return lambda step: _warmup(options, peak_lr, step) or peak_lr


def _decay(options, peak_lr: float, total_steps: int, shape: Callable[[float], float]) -> Schedule:
    end = options.decay_steps or total_steps

    def lr(step: int) -> float:
        warm = _warmup(options, peak_lr, step)
        if warm is not None:
            return warm
        span = max(1, end - options.warmup_steps)
        progress = min(1.0, (step - options.warmup_steps) / span)
        return options.min_lr + (peak_lr - options.min_lr) * shape(progress)

    return lr


def build_cosine(options, *, peak_lr: float, total_steps: int) -> Schedule:
    return _decay(options, peak_lr, total_steps, lambda p: 0.5 * (1.0 + math.cos(math.pi * p)))


def build_linear(options, *, peak_lr: float, total_steps: int) -> Schedule:
    return _decay(options, peak_lr, total_steps, lambda p: 1.0 - p)


_WSD_SHAPES: dict[str, Callable[[float], float]] = {
    "linear": lambda p: 1.0 - p,
    "cosine": lambda p: 0.5 * (1.0 + math.cos(math.pi * p)),
    "sqrt": lambda p: 1.0 - math.sqrt(p),
}


def build_wsd(options, *, peak_lr: float, total_steps: int) -> Schedule:
    decay_start = total_steps - max(1, round(options.decay_fraction * total_steps))
    shape = _WSD_SHAPES[options.decay_style]

    def lr(step: int) -> float:
        warm = _warmup(options, peak_lr, step)
        if warm is not None:
            return warm
        if step < decay_start:
            return peak_lr
        progress = min(1.0, (step - decay_start) / max(1, total_steps - decay_start))
        return options.min_lr + (peak_lr - options.min_lr) * shape(progress)

    return lr
