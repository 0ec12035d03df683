"""Plugin API v1: everything a plugin may import from llmforge, in one module.

docs/plugins.md documents each name. Everything else in llmforge is private to plugins: it may
change in any release (today's import paths, such as `llmforge.registry.Component`, keep working
in this version without a warning, but are not part of the contract).

Importing this module imports no torch (`validate`, `plan` and `schema` load every plugin's
hooks module). `Document`, `SourceContext`, `ErrorPolicy`, `EvalContext` and `ValBatch` are
loaded on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from llmforge.registry.components import EVALUATOR_NEEDS, RESERVED_METRIC_KEYS, Component
from llmforge.registry.errors import OptionsError
from llmforge.registry.manager import API_VERSION, hookimpl
from llmforge.registry.protocols import (
    Callback,
    CallbackFactory,
    Evaluator,
    EvaluatorFactory,
    LRSchedule,
    LRScheduleFactory,
    MetricsRow,
    ModelFactory,
    OptimizerFactory,
    Reward,
    RewardFactory,
    SourceFactory,
    TokenizerFactory,
)
from llmforge.spec.base import StrictModel, field_error
from llmforge.spec.errors import UserError

if TYPE_CHECKING:
    from llmforge.data.errors import ErrorPolicy
    from llmforge.data.sources import Document, SourceContext
    from llmforge.runtime.evaluate import EvalContext, ValBatch

_LAZY = {
    "Document": "llmforge.data.sources",
    "SourceContext": "llmforge.data.sources",
    "ErrorPolicy": "llmforge.data.errors",
    "EvalContext": "llmforge.runtime.evaluate",
    "ValBatch": "llmforge.runtime.evaluate",
}

__all__ = [
    "API_VERSION", "EVALUATOR_NEEDS", "RESERVED_METRIC_KEYS",
    "Callback", "CallbackFactory", "Component", "Document", "ErrorPolicy", "EvalContext", "Evaluator", "EvaluatorFactory",
    "LRSchedule", "LRScheduleFactory", "MetricsRow", "ModelFactory", "OptimizerFactory", "OptionsError", "Reward",
    "RewardFactory", "SourceContext", "SourceFactory", "StrictModel", "TokenizerFactory", "UserError", "ValBatch",
    "field_error", "hookimpl",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'llmforge.plugin' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
