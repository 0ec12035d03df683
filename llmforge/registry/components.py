"""Component registry: name → (options model, factory, provider), with did-you-mean."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from pydantic import BaseModel, Field, create_model

from llmforge.spec.errors import did_you_mean

# kind → (hook that registers it, the key that selects it in the spec)
KINDS: dict[str, tuple[str, str]] = {
    "tokenizer": ("register_tokenizers", "name"),
    "source": ("register_sources", "name"),
    "model": ("register_models", "name"),
    "optimizer": ("register_optimizers", "name"),
    "lr_schedule": ("register_lr_schedules", "name"),
    "stage": ("register_stage_types", "type"),
    "evaluator": ("register_evaluators", "name"),
    "callback": ("register_callbacks", "name"),
    "reward": ("register_rewards", "name"),
}


class RegistryError(Exception):
    """A component that cannot be found, built, or registered twice."""


@dataclass(frozen=True)
class Component:
    """What a plugin registers.

    Args:
        factory: "module:function" (imported only when the component is built, so that
            validation never imports torch) or a callable; None means declared but not
            built yet, and `run` refuses it with a message naming it.
    """

    name: str
    options: type[BaseModel]
    factory: str | Callable[..., Any] | None = None
    description: str = ""


@dataclass(frozen=True)
class Registered:
    kind: str
    component: Component
    provider: str
    version: str
    typed_options: type[BaseModel] = field(compare=False, repr=False, default=None)  # type: ignore[assignment]

    @property
    def label(self) -> str:
        return f"{self.component.name} [{self.provider} {self.version}]"


def _typed(kind: str, comp: Component) -> type[BaseModel]:
    """The options model with its selecting literal (`name: Literal['adamw']`) added."""
    key = KINDS[kind][1]
    title = f"{kind}:{comp.name}"
    field_info = Field(description=f"Selects the {kind} component {comp.name!r}.")
    return create_model(
        title,
        __base__=comp.options,
        __doc__=comp.options.__doc__ or comp.description,
        __module__=comp.options.__module__,
        **{key: (Literal[comp.name], field_info)},  # type: ignore[call-overload]
    )


class Registry:
    """Every component of every kind, with who provides it."""

    def __init__(self) -> None:
        self.entries: dict[str, dict[str, Registered]] = {kind: {} for kind in KINDS}
        self.failures: list[str] = []

    def add(self, kind: str, comp: Component, provider: str, version: str) -> None:
        if not isinstance(comp, Component):
            raise RegistryError(f"{provider} returned {comp!r} from {KINDS[kind][0]}; expected llmforge.registry.Component objects")
        existing = self.entries[kind].get(comp.name)
        if existing is not None:
            raise RegistryError(
                f"{kind} {comp.name!r} is registered twice: by {existing.provider} {existing.version} and by {provider} {version}; "
                f"uninstall one of them or rename the component"
            )
        self.entries[kind][comp.name] = Registered(kind, comp, provider, version, _typed(kind, comp))

    def names(self, kind: str) -> list[str]:
        return sorted(self.entries[kind])

    def registered_text(self, kind: str) -> str:
        return ", ".join(r.label for _, r in sorted(self.entries[kind].items())) or "none"

    def unknown_message(self, kind: str, name: str) -> str:
        guess = did_you_mean(name, self.names(kind))
        hint = f"; did you mean {guess!r}?" if guess else ""
        return f"unknown {kind} {name!r}{hint} (registered: {self.registered_text(kind)})"

    def get(self, kind: str, name: str) -> Registered:
        try:
            return self.entries[kind][name]
        except KeyError:
            raise RegistryError(self.unknown_message(kind, name)) from None

    def factory(self, kind: str, name: str) -> Callable[..., Any]:
        """The callable that builds a component; clear errors for the not-yet-built and broken ones."""
        reg = self.get(kind, name)
        fac = reg.component.factory
        if fac is None:
            raise RegistryError(
                f"{kind} {name!r} ({reg.provider} {reg.version}) is declared but not implemented yet, so it cannot run; "
                f"`llmforge validate` accepts it, `llmforge run` does not"
            )
        if callable(fac):
            return fac
        module_name, _, attr = fac.partition(":")
        try:
            return getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as e:
            raise RegistryError(f"{kind} {name!r} from {reg.provider}: cannot import its factory {fac!r}: {e}") from e

    def build(self, kind: str, options: BaseModel, **runtime: Any) -> Any:
        """Build a component from its validated options; runtime objects arrive as keyword arguments."""
        key = KINDS[kind][1]
        return self.factory(kind, getattr(options, key))(options, **runtime)

    def listing(self) -> list[dict[str, str]]:
        return [
            {"kind": kind, "name": r.component.name, "provider": r.provider, "version": r.version}
            for kind in KINDS
            for _, r in sorted(self.entries[kind].items())
        ]
