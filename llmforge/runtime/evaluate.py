"""Evaluators: what they can ask of a stage (EvalContext), and the built-in `val_loss`."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass
class EvalContext:
    """The contract every evaluator factory receives as `context` (see hookspecs)."""

    stage: Any
    tokenizer: Any
    val_loss: Callable[[int], tuple[float, int]]  # iters -> (mean loss per token, tokens)
    generate: Callable[[list[int], int], list[int] | None]  # greedy continuation ids (None where unsupported)
    log: Callable[[str], None]
    eval_iters: int

    def sample(self, prompt: str | None, n: int, val_loader_fn: Callable[[], Any]) -> str | None:
        """A short greedy sample: from `prompt`, or from the first tokens of a val sequence."""
        if n <= 0:
            return None
        if prompt is not None:
            ids = self.tokenizer.encode(prompt)
        else:
            batch = val_loader_fn().next_global_batch()[0]
            ids = batch[0, :16].tolist()
        out = self.generate(ids, n)
        if out is None:
            return None
        return self.tokenizer.decode(ids + list(out))


class ValLoss:
    def __init__(self, options, *, context: EvalContext):
        self.context = context

    def evaluate(self, step: int) -> dict[str, float]:
        loss, _ = self.context.val_loss(self.context.eval_iters)
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}


def build_evaluators(registry, options_list, context: EvalContext) -> list[Any]:
    return [registry.build("evaluator", opts, context=context) for opts in options_list]
