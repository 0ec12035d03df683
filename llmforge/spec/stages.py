"""Options models of the built-in stage types. The registry adds each one's `type` literal."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from llmforge.spec.base import EvaluatorRef, LRScheduleRef, OptimizerRef, SourceRef, StrictModel


class TrainConfig(StrictModel):
    """The optimization loop of a training stage (pretrain, sft, ...)."""

    micro_batch_size: int = Field(..., ge=1, description="Sequences per forward/backward on one data-parallel rank.")
    global_batch_size: int = Field(
        ...,
        ge=1,
        description="Sequences per optimizer step over all ranks. Gradient-accumulation steps = global / (micro × data-parallel size), which must divide exactly.",
    )
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps. Give exactly one of max_steps, max_tokens, max_epochs.")
    max_tokens: int | None = Field(None, ge=1, description="Stop after this many training tokens (rounded up to whole steps).")
    max_epochs: float | None = Field(None, gt=0, description="Stop after this many passes over the training split.")
    optimizer: OptimizerRef = Field(default_factory=lambda: {"name": "adamw"}, description="Optimizer component, e.g. `{name: adamw, lr: 3.0e-4}`.")
    lr_schedule: LRScheduleRef = Field(
        default_factory=lambda: {"name": "cosine"}, description="Learning-rate schedule component, e.g. `{name: cosine, warmup_steps: 100}`."
    )
    clip_grad: float | None = Field(1.0, gt=0, description="Clip the global gradient norm to this value; None disables clipping.")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="`bf16`: bf16 autocast with fp32 master weights (a 2-3x lever on CPU too).")
    eval_interval: int | None = Field(None, ge=1, description="Run the stage's evaluators every this many steps (and at the end). None = only at the end.")
    eval_iters: int = Field(10, ge=1, description="Validation batches per evaluation.")
    on_nonfinite: Literal["stop", "skip"] = Field(
        "stop", description="A NaN/Inf loss or gradient: `stop` (weights untouched, non-zero exit) or `skip` the step and count it."
    )

    @model_validator(mode="after")
    def _one_budget(self) -> TrainConfig:
        given = [k for k in ("max_steps", "max_tokens", "max_epochs") if getattr(self, k) is not None]
        if len(given) != 1:
            got = ", ".join(given) if given else "none"
            raise ValueError(f"give exactly one of max_steps, max_tokens, max_epochs (got {got})")
        return self


class StageBase(StrictModel):
    """Fields every stage has."""

    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$", description="Unique stage name; later stages refer to it with `init_from`.")
    init_from: str | None = Field(None, description="Start from the final checkpoint of this earlier stage (by name).")


class PrepareStage(StageBase):
    """Train or load the tokenizer, tokenize the `data` sources and write WebDataset shards."""

    packing: Literal["windows", "documents"] = Field(
        "windows", description="`windows`: fixed seq_length+1 token windows across documents; `documents`: keep document boundaries."
    )


class PretrainStage(StageBase):
    """Next-token pretraining on the prepared shards."""

    train: TrainConfig = Field(..., description="Batch, budget, optimizer and schedule.")
    evaluators: list[EvaluatorRef] = Field(
        default_factory=lambda: [{"name": "val_loss"}], description="Evaluators run every eval_interval steps and at the end of the stage."
    )


class SFTData(StrictModel):
    """Instruction data of a finetune stage."""

    sources: dict[str, SourceRef] = Field(..., min_length=1, description="Named instruction sources, e.g. `{name: instructions, paths: [...]}`.")
    val_fraction: float = Field(0.05, ge=0.0, lt=1.0, description="Fraction of examples held out for validation.")


class SFTStage(StageBase):
    """Supervised finetuning: loss only on response tokens, through a chat template."""

    data: SFTData = Field(..., description="Instruction or chat data.")
    chat_template: str = Field(
        "default", description="A built-in chat template (`default`, `plain`), or a template string with {prompt} and {response}."
    )
    max_seq_length: int | None = Field(
        None, ge=8, description="Pad or truncate every example to this many tokens (≤ model.seq_length); None = model.seq_length. Short tasks train much faster."
    )
    train: TrainConfig = Field(..., description="Batch, budget, optimizer and schedule.")
    evaluators: list[EvaluatorRef] = Field(
        default_factory=lambda: [{"name": "val_loss"}], description="Evaluators run every eval_interval steps and at the end of the stage."
    )
