"""Every llmforge hook. Each returns a list of `Component`s; the registry flattens them.

A plugin implements any of these with `@llmforge.registry.hookimpl` and exposes the
module (or object) under the `llmforge` entry-point group. Built-ins do exactly the same
(`llmforge.builtins`). `docs/plugins.md` documents each hook; a test keeps them in step.
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("llmforge")


@hookspec
def register_tokenizers() -> list:
    """Tokenizers, chosen by `tokenizer.name`. Factory: `(options, *, run_dir, texts) -> Tokenizer`."""


@hookspec
def register_sources() -> list:
    """Data sources, chosen by `data.sources.<id>.name`. Factory: `(options) -> iterator of documents`."""


@hookspec
def register_models() -> list:
    """Model architectures, chosen by `model.name`. Factory: `(options, *, parallelism, precision) -> model chunks`."""


@hookspec
def register_optimizers() -> list:
    """Optimizers, chosen by `train.optimizer.name`. Factory: `(options, *, params) -> torch.optim.Optimizer`."""


@hookspec
def register_lr_schedules() -> list:
    """Learning-rate schedules, chosen by `train.lr_schedule.name`. Factory: `(options, *, peak_lr, total_steps) -> step -> lr`."""


@hookspec
def register_stage_types() -> list:
    """Stage types, chosen by `stages[i].type`. Factory: `(options, *, context) -> None` runs the stage."""


@hookspec
def register_evaluators() -> list:
    """Evaluators, listed in a stage's `evaluators`. Factory: `(options, *, context) -> evaluator` with `evaluate(model, step) -> dict`."""


@hookspec
def register_callbacks() -> list:
    """Training callbacks and loggers, listed in `logging.callbacks`. Factory: `(options, *, run_dir) -> callback` with `on_log(row)`."""


@hookspec
def register_rewards() -> list:
    """Reward functions for RL stages. Factory: `(options, *, tokenizer) -> (prompts, completions) -> list[float]`."""
