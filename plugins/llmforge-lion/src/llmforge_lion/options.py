"""Options models: what a spec may write under each of this plugin's components."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from llmforge.plugin import StrictModel


class LionOptions(StrictModel):
    """Lion (Chen et al. 2023): the update is the sign of an interpolated momentum.

    Its update has unit size per coordinate, so it wants a learning rate 3-10x smaller
    than AdamW's and a weight decay 3-10x larger to apply the same decay per step.
    """

    lr: float = Field(1.0e-4, gt=0, description="Peak learning rate; about 3-10x smaller than AdamW's for the same model.")
    betas: tuple[float, float] = Field(
        (0.9, 0.99), description="beta1 interpolates momentum and gradient for the update; beta2 is the momentum's decay."
    )
    weight_decay: float = Field(0.0, ge=0, description="Decoupled weight decay, scaled by lr; about 3-10x larger than AdamW's.")

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, betas: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"each beta must be in [0, 1), got {list(betas)}")
        return betas


class SampleDiversityOptions(StrictModel):
    """Distinct-n of greedy continuations (Li et al. 2016): the share of n-grams that are unique.

    A model that loops ("the the the", a repeated line) scores near 0, long before the loss
    shows it.
    """

    prompts: list[str] = Field(
        default_factory=lambda: ["\n"], min_length=1, description="Prompts to continue; every continuation counts towards one score."
    )
    max_new_tokens: int = Field(64, ge=2, description="Tokens generated per prompt.")
    ngram_orders: list[int] = Field(
        default_factory=lambda: [1, 2, 3], min_length=1, description="The n of each distinct-n metric reported, e.g. [1, 2] gives distinct_1 and distinct_2."
    )
    unit: Literal["token", "word"] = Field("token", description="Count n-grams of token ids (`token`) or of whitespace-separated decoded words (`word`).")

    @field_validator("ngram_orders")
    @classmethod
    def _positive_orders(cls, orders: list[int]) -> list[int]:
        if any(n < 1 for n in orders):
            raise ValueError(f"n-gram orders must be ≥ 1, got {orders}")
        return sorted(set(orders))


class CSVLoggerOptions(StrictModel):
    """Append every metrics row to a CSV file in the run dir, for spreadsheets and pandas."""

    filename: str = Field("metrics.csv", min_length=1, description="File name, relative to the run dir.")
    columns: list[str] | None = Field(
        None,
        description="Write only these columns, in this order. None = every key seen so far; a new key "
        "rewrites the file once with the wider header.",
    )
    summary_filename: str | None = Field("stages.csv", description="One row per finished stage with its summary; None = off.")
