"""`inverse_sqrt`: linear warmup, then the learning rate falls as 1/sqrt(step)."""

from __future__ import annotations

import math

from llmforge.plugin import LRSchedule

from llmforge_extras.options import InverseSqrtOptions


def inverse_sqrt(options: InverseSqrtOptions, *, peak_lr: float, total_steps: int) -> LRSchedule:
    """Factory of the `inverse_sqrt` schedule (`llmforge.plugin.LRScheduleFactory`).

    `step` counts optimizer steps from 0, so step 0 already trains at peak_lr / warmup_steps.
    """
    warmup = options.warmup_steps

    def lr(step: int) -> float:
        if step < warmup:
            return peak_lr * (step + 1) / warmup
        return max(options.min_lr, peak_lr * math.sqrt(warmup / (step + 1)))

    return lr
