"""The factory contract of each component kind, as typing Protocols (plugin API v1).

llmforge calls every factory as `factory(options, **runtime)`: the validated options
positionally, everything else by keyword. The Protocols say so with keyword-only arguments;
a factory may accept them positionally too. Keywords may be added in later versions of the
API, never removed. docs/plugins.md documents each one; a test binds every built-in factory
to its kind's keywords, and another checks that llmforge passes exactly those.

Torch-free: model chunks, parameters and optimizers are typed `Any` here.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypedDict, runtime_checkable

from pydantic import BaseModel

if TYPE_CHECKING:
    from llmforge.data.sources import Document, SourceContext
    from llmforge.runtime.evaluate import EvalContext

# kind → the keyword arguments its factory receives (after the options).
FACTORY_KEYWORDS: dict[str, tuple[str, ...]] = {
    "tokenizer": ("run_dir", "texts"),
    "source": ("context",),
    "model": ("parallelism", "precision", "seed"),
    "optimizer": ("params",),
    "lr_schedule": ("peak_lr", "total_steps"),
    "stage": ("context",),
    "evaluator": ("context",),
    "callback": ("run_dir", "spec", "stage"),
    "reward": ("tokenizer", "context", "stage"),
}
# Keywords a factory is given only in some runs (API 1.1): a model factory gets `fp8`, megatron's
# FP8 recipe fields, only under `precision: fp8`, so a factory written for 1.0 keeps working
# everywhere else.
FACTORY_OPTIONAL_KEYWORDS: dict[str, tuple[str, ...]] = {"model": ("fp8",)}


class MetricsRow(TypedDict, total=False):
    """A row of metrics.jsonl, as a callback's `on_log` receives it.

    Every row has `kind`, `stage`, `step` and `tokens`. `kind: "train"` rows have the rest of
    the keys below; `kind: "eval"` rows add each evaluator's metrics (any str → number key that
    is not reserved, `RESERVED_METRIC_KEYS`); a stage may write rows of its own kinds (the RL
    stage's `rollout`). `None` where a value is unknown (`mfu` on a CPU without a peak).
    """

    kind: str  # "train", "eval", or a stage's own
    stage: str  # the stage's name
    step: int  # optimizer steps done in this stage (from 1; an eval row of a finetune stage's start: 0)
    tokens: int  # real input tokens read so far in this stage, over every rank
    loss: float  # this step's mean loss per token (nats)
    lr: float  # the learning rate of this step
    grad_norm: float  # the gradient norm before clipping
    tokens_per_s: float  # the job's, since the previous train row
    mfu: float | None  # model FLOPs utilization per device
    memory_mb: float  # peak accelerator (or process) memory
    skipped_steps: int  # steps skipped so far (non-finite, spikes)
    spikes: int  # loss spikes seen so far
    skipped_samples: int  # bad samples the loader skipped (data.on_error: skip)


class TokenizerFactory(Protocol):
    def __call__(self, options: BaseModel, /, *, run_dir: Path, texts: Iterable[str]) -> Any:
        """A tokenizer: `encode(text) -> list[int]`, `decode(ids) -> str`, `vocab_size`."""


class SourceFactory(Protocol):
    def __call__(self, options: BaseModel, /, *, context: SourceContext) -> Iterable[Document]:
        """The documents, each a `Document(content, origin)`; bad input goes to `context.errors.bad`."""


class ModelFactory(Protocol):
    def __call__(self, options: BaseModel, /, *, parallelism: BaseModel, precision: str, seed: int) -> list[Any]:
        """This rank's model chunks (megatron modules), one per virtual pipeline stage.

        Under `precision: fp8` it is also given `fp8=` (FACTORY_OPTIONAL_KEYWORDS): a dict of
        megatron's TransformerConfig fp8 fields."""


class OptimizerFactory(Protocol):
    def __call__(self, options: BaseModel, /, *, params: list[dict[str, Any]]) -> Any:
        """A `torch.optim.Optimizer` over the parameter groups (keys: docs/plugins.md)."""


@runtime_checkable
class LRSchedule(Protocol):
    def __call__(self, step: int) -> float:
        """The learning rate of optimizer step `step` (0 for the first step)."""


class LRScheduleFactory(Protocol):
    def __call__(self, options: BaseModel, /, *, peak_lr: float, total_steps: int) -> LRSchedule: ...


@runtime_checkable
class Evaluator(Protocol):
    def evaluate(self, step: int) -> dict[str, float]:
        """Metrics for the eval row of `step`; every rank calls it, rank 0's result is written."""


class EvaluatorFactory(Protocol):
    def __call__(self, options: BaseModel, /, *, context: EvalContext) -> Evaluator: ...


@runtime_checkable
class Callback(Protocol):
    """`on_log` is called for every metrics row; a callback may also define
    `on_stage_end(stage: str, summary: dict) -> None`, called once after each stage."""

    def on_log(self, row: MetricsRow) -> None: ...


class CallbackFactory(Protocol):
    def __call__(self, options: BaseModel, /, *, run_dir: Path, spec: BaseModel, stage: BaseModel) -> Callback:
        """A callback for one stage: `spec` is the resolved spec and `stage` this stage's options
        (copies: changing them changes nothing)."""


@runtime_checkable
class Reward(Protocol):
    def __call__(self, samples: list[Any]) -> list[float]:
        """One reward per `llmforge.finetune.rewards.Sample`."""


class RewardFactory(Protocol):
    def __call__(self, options: BaseModel, /, *, tokenizer: Any, context: Any, stage: BaseModel) -> Reward: ...


FACTORY_PROTOCOLS: dict[str, type] = {
    "tokenizer": TokenizerFactory,
    "source": SourceFactory,
    "model": ModelFactory,
    "optimizer": OptimizerFactory,
    "lr_schedule": LRScheduleFactory,
    "evaluator": EvaluatorFactory,
    "callback": CallbackFactory,
    "reward": RewardFactory,
}
