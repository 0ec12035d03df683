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


# Keys of an eval row that the loop writes, or that TensorBoard files under `train/`: an
# evaluator may not return them (docs/plugins.md lists them; a test keeps the two equal).
RESERVED_METRIC_KEYS = frozenset({
    "kind", "stage", "step", "tokens", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "memory_mb",
    "skipped_steps", "spikes", "skipped_samples",
})
# What an evaluator may need from its stage beyond generation and scoring (validate refuses a mismatch).
EVALUATOR_NEEDS = frozenset({"val_split", "logprobs", "reference_logprobs", "reward_scores", "rewards"})


class RegistryError(Exception):
    """A component that cannot be found, built, or registered twice."""


@dataclass(frozen=True)
class Component:
    """What a plugin registers.

    Args:
        factory: "module:function" (imported only when the component is built, so that
            validation never imports torch) or a callable; None means declared but not
            built yet, and `run` refuses it with a message naming it.
        description: one line, shown by `llmforge plugins` and `llmforge schema`.
        needs: evaluators only: what they need from their stage (`EVALUATOR_NEEDS`), so that
            `validate` refuses them under a stage that lacks it.
        metrics: evaluators only: the metric keys they return, so that `validate` refuses two
            evaluators of a stage returning the same key.
    """

    name: str
    options: type[BaseModel]
    factory: str | Callable[..., Any] | None = None
    description: str = ""
    needs: frozenset[str] = frozenset()
    metrics: tuple[str, ...] = ()


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


def _typed(kind: str, comp: Component, provider: str, version: str) -> type[BaseModel]:
    """The options model with its selecting literal (`name: Literal['adamw']`) added.

    An evaluator's model also carries what the component declares (`needs`, `metrics`), which
    the spec checks read; a plugin's says which distribution provides it (`llmforge schema`).
    """
    key = KINDS[kind][1]
    title = f"{kind}:{comp.name}"
    field_info = Field(description=f"Selects the {kind} component {comp.name!r}.")
    doc = (comp.options.__doc__ or comp.description or "").strip()
    if provider != "llmforge":
        doc = f"From the plugin {provider} {version}. {doc}".strip()
    model = create_model(
        title,
        __base__=comp.options,
        __doc__=doc,
        __module__=comp.options.__module__,
        **{key: (Literal[comp.name], field_info)},  # type: ignore[call-overload]
    )
    model.provider = f"{provider} {version}"
    if kind == "evaluator":
        model.needs = frozenset(comp.needs) | getattr(comp.options, "needs", frozenset())
        model.metric_keys = tuple(comp.metrics)
    return model


class Registry:
    """Every component of every kind, with who provides it."""

    def __init__(self) -> None:
        self.entries: dict[str, dict[str, Registered]] = {kind: {} for kind in KINDS}
        self.failures: list[str] = []  # warning lines: plugins not loaded, hooks that raised
        self.unloaded: list[str] = []  # installed plugins not loaded (an import error, another API version), and why

    def add(self, kind: str, comp: Component, provider: str, version: str) -> None:
        if not isinstance(comp, Component):
            raise RegistryError(f"{provider} returned {comp!r} from {KINDS[kind][0]}; expected llmforge.registry.Component objects")
        existing = self.entries[kind].get(comp.name)
        if existing is not None:
            clash = f"{kind} {comp.name!r} is registered twice: by {existing.provider} {existing.version} and by {provider} {version}; "
            if existing.provider == "llmforge":
                raise RegistryError(clash + f"{comp.name!r} is a built-in name: the plugin must rename its component")
            raise RegistryError(clash + f"uninstall one of them, rename the component, or switch one off with "
                                        f"LLMFORGE_DISABLE_PLUGINS={provider}")
        if kind == "optimizer" and "lr" not in getattr(comp.options, "model_fields", {}):
            raise RegistryError(f"optimizer {comp.name!r} ({provider} {version}): its options have no `lr` field, "
                                "which the LR schedule reads as its peak; the plugin must add one")
        if kind == "evaluator":
            self._check_evaluator(comp, provider, version)
        self.entries[kind][comp.name] = Registered(kind, comp, provider, version, _typed(kind, comp, provider, version))

    @staticmethod
    def _check_evaluator(comp: Component, provider: str, version: str) -> None:
        where = f"evaluator {comp.name!r} ({provider} {version})"
        reserved = sorted(set(comp.metrics) & RESERVED_METRIC_KEYS)
        if reserved:
            raise RegistryError(f"{where} declares the metric key(s) {', '.join(reserved)}, which the metrics row reserves "
                                f"(reserved: {', '.join(sorted(RESERVED_METRIC_KEYS))}); the plugin must rename them")
        unknown = sorted(set(comp.needs) - EVALUATOR_NEEDS)
        if unknown:
            raise RegistryError(f"{where} needs {', '.join(unknown)}, which no stage offers "
                                f"(an evaluator may need: {', '.join(sorted(EVALUATOR_NEEDS))})")

    def names(self, kind: str) -> list[str]:
        return sorted(self.entries[kind])

    def registered_text(self, kind: str) -> str:
        return ", ".join(r.label for _, r in sorted(self.entries[kind].items())) or "none"

    def unknown_message(self, kind: str, name: str) -> str:
        guess = did_you_mean(name, self.names(kind))
        hint = f"; did you mean {guess!r}?" if guess else ""
        broken = "".join(f"; plugin {line}: it is installed but not loaded, and may be the one that provides it" for line in self.unloaded)
        return f"unknown {kind} {name!r}{hint} (registered: {self.registered_text(kind)}){broken}"

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
        """Build a component from its validated options; runtime objects arrive as keyword arguments.

        A plugin's factory that raises comes out as a `PluginError` naming the component (a
        stage type's does not: a stage runs the whole stage inside its factory).
        """
        from llmforge.registry.errors import PluginError

        name = getattr(options, KINDS[kind][1])
        factory = self.factory(kind, name)
        reg = self.entries[kind][name]
        if reg.provider == "llmforge" or kind == "stage":
            return factory(options, **runtime)
        try:
            built = factory(options, **runtime)
        except PluginError:
            raise
        except Exception as e:
            raise PluginError(reg, e, "while being built") from e
        return _checked_documents(reg, built) if kind == "source" else built

    def listing(self) -> list[dict[str, str]]:
        return [
            {"kind": kind, "name": r.component.name, "provider": r.provider, "version": r.version, "description": r.component.description}
            for kind in KINDS
            for _, r in sorted(self.entries[kind].items())
        ]


def _checked_documents(reg: Registered, docs: Any) -> Any:
    """A plugin source's documents; anything but a `Document` is refused naming the source."""
    from llmforge.data.sources import Document
    from llmforge.registry.errors import PluginError

    try:
        for doc in docs:
            if not isinstance(doc, Document):
                shown = repr(doc) if len(repr(doc)) < 60 else repr(doc)[:57] + "..."
                raise PluginError(reg, TypeError(f"yielded {type(doc).__name__} {shown}; a source yields "
                                                 "llmforge.plugin.Document(content, origin) objects"), "while running")
            yield doc
    except PluginError:
        raise
    except Exception as e:
        raise PluginError(reg, e, "while running") from e
