"""Options models: what a spec may write under each of this plugin's components."""

from __future__ import annotations

from pydantic import Field

from llmforge.plugin import StrictModel


class CSVColumnOptions(StrictModel):
    """One column of CSV files (with a header row); each non-empty cell is a document."""

    # `paths` by that name: `llmforge validate` checks that every path or glob matches a file.
    paths: list[str] = Field(..., min_length=1, description="CSV files or globs (`**` recurses).")
    column: str = Field(..., min_length=1, description="The header of the column to read.")
    delimiter: str = Field(",", min_length=1, max_length=1, description="The field separator (`\\t` for TSV).")


class InverseSqrtOptions(StrictModel):
    """Linear warmup to the optimizer's lr, then lr × sqrt(warmup_steps / (step + 1)) (Vaswani et al. 2017).

    It never needs the run's length, so a run can be extended without changing its schedule.
    """

    warmup_steps: int = Field(100, ge=1, description="Steps of linear warmup; the decay then starts from the peak.")
    min_lr: float = Field(0.0, ge=0, description="The learning rate never goes below this.")

