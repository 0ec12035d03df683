"""llmforge-extras: an example plugin with a data source and an LR schedule.

This module is the entry point (group `llmforge`): it imports only `llmforge.plugin` and the
options models, so `llmforge validate` stays fast; the factories are "module:function"
strings, imported when a run builds the component.
"""

from __future__ import annotations

from llmforge.plugin import Component, hookimpl

from llmforge_extras.options import CSVColumnOptions, InverseSqrtOptions

__version__ = "0.1.0"
LLMFORGE_API = ">=1,<2"


@hookimpl
def register_sources() -> list[Component]:
    return [Component("csv_column", CSVColumnOptions, "llmforge_extras.source:csv_column", "one column of CSV files, a document per row")]


@hookimpl
def register_lr_schedules() -> list[Component]:
    return [Component("inverse_sqrt", InverseSqrtOptions, "llmforge_extras.schedule:inverse_sqrt", "warmup, then lr ∝ 1/sqrt(step)")]
