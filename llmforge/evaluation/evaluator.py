"""The `lm_eval` evaluator: lm-evaluation-harness tasks at a training stage's evaluation steps.

It serves the harness from the stage's own `ModelServer` (the weights being trained, at the
run's layout) and returns each task's metrics as `<task>/<metric>` keys (harness.metrics), which
the loop writes to metrics.jsonl and TensorBoard like every evaluator's. The harness seeds
Python's, numpy's and torch's global generators; they are put back afterwards, so evaluating
changes nothing in training.
"""

from __future__ import annotations

import contextlib
import io
import re
from typing import Any


@contextlib.contextmanager
def kept_random_state():
    """Python's, numpy's and torch's (CPU and CUDA) global generator states, restored on the way out."""
    import random

    import numpy as np
    import torch

    states = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
              torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if states[3] is not None:
            torch.cuda.set_rng_state_all(states[3])


class LMEvalEvaluator:
    """Tasks listed in the options, found once (at the stage's start) and run at every evaluation."""

    def __init__(self, options, *, context):
        from llmforge.evaluation.harness import check_tasks, quiet, require_lm_eval, task_manager

        require_lm_eval()
        quiet()
        self.options, self.context = options, context
        self.manager = task_manager(options.include_path)
        check_tasks(self.manager, options.tasks, options.include_path)

    def evaluate(self, step: int) -> dict[str, Any]:
        from llmforge.evaluation import harness
        from llmforge.evaluation.adapter import LlmforgeLM

        ctx, opts = self.context, self.options
        lm = LlmforgeLM(ctx.server, ctx.tokenizer, batch_size=opts.batch_size or ctx.micro_batch_size)
        said = io.StringIO()
        # The console is llmforge's: the harness's progress bars and notices go to run.log.
        with kept_random_state(), contextlib.redirect_stderr(said):
            results = harness.run(lm, self.manager, tasks=opts.tasks, num_fewshot=opts.num_fewshot, limit=opts.limit,
                                  apply_chat_template=opts.apply_chat_template, system_instruction=opts.system_instruction)
        notices = [line for line in re.split(r"[\r\n]+", said.getvalue()) if line.strip() and "it/s]" not in line]
        detail = getattr(ctx.log, "detail", None)
        if notices and detail is not None:
            detail("\n".join(f"[lm_eval] {line}" for line in notices))
        return {} if results is None else harness.metrics(results)  # ranks other than the first replica's: rank 0 writes
