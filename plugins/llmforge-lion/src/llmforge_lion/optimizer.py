"""The Lion optimizer in plain torch (Chen et al. 2023, Algorithm 2).

    update = sign(beta1 * m + (1 - beta1) * g)
    p      = p * (1 - lr * weight_decay) - lr * update
    m      = beta2 * m + (1 - beta2) * g

One state tensor per parameter (AdamW keeps two), and the update is the same size for
every coordinate, which is why Lion wants a smaller lr and a larger weight decay.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from llmforge_lion.options import LionOptions


class Lion(torch.optim.Optimizer):
    """Lion with decoupled weight decay; param groups may override lr, betas and weight_decay."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99), weight_decay: float = 0.0):
        if lr <= 0:
            raise ValueError(f"Lion lr must be > 0, got {lr}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"Lion betas must be in [0, 1), got {betas}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), wd = group["lr"], group["betas"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                exp_avg = state["exp_avg"]
                if wd:
                    p.mul_(1 - lr * wd)
                # The update interpolates with beta1, but the momentum decays with beta2:
                # this split is what distinguishes Lion from signed momentum SGD.
                update = exp_avg.mul(beta1).add_(grad, alpha=1 - beta1).sign_()
                p.add_(update, alpha=-lr)
                exp_avg.mul_(beta2).add_(grad, alpha=1 - beta2)
        return loss


def build_lion(options: LionOptions, *, params: Iterable[Any]) -> Lion:
    """Factory for the `lion` optimizer (`llmforge.plugin.OptimizerFactory`); honours each group's `weight_decay`."""
    return Lion(params, lr=options.lr, betas=options.betas, weight_decay=options.weight_decay)
