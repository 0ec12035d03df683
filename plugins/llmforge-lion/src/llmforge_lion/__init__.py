"""llmforge-lion: an example plugin contributing an optimizer, an evaluator and a callback.

This module is the entry point (group `llmforge`). It imports no torch: `llmforge
validate` loads it to learn the options models, and factories are "module:function"
strings imported only when a run builds the component.
"""

from __future__ import annotations

from llmforge.plugin import Component, hookimpl

from llmforge_lion.options import CSVLoggerOptions, LionOptions, SampleDiversityOptions

__version__ = "0.1.0"
LLMFORGE_API = ">=1,<2"  # the llmforge plugin API this release is written against


@hookimpl
def register_optimizers() -> list[Component]:
    return [Component("lion", LionOptions, "llmforge_lion.optimizer:build_lion", "Lion: signed momentum, half of AdamW's state")]


@hookimpl
def register_evaluators() -> list[Component]:
    return [
        Component(
            "sample_diversity",
            SampleDiversityOptions,
            "llmforge_lion.evaluator:build_sample_diversity",
            "distinct-n of greedy samples (repetition detector)",
            metrics=("sample_length",),
        )
    ]


@hookimpl
def register_callbacks() -> list[Component]:
    return [Component("csv_logger", CSVLoggerOptions, "llmforge_lion.callback:build_csv_logger", "metrics rows to a CSV file")]
