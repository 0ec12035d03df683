"""Validate loaded spec data against the registry-typed models; locate every error."""

from __future__ import annotations

import typing
import weakref
from typing import Annotated, Any, Union

from pydantic import BaseModel, TypeAdapter, ValidationError

from llmforge.registry.components import KINDS, Registry
from llmforge.spec.errors import SpecError, SpecIssue, did_you_mean
from llmforge.spec.load import LoadedSpec
from llmforge.spec.resolve_types import specialize
from llmforge.spec.schema import Spec

# Weak keys: an id() key could be reused by a later registry once the first is collected.
_MODELS: weakref.WeakKeyDictionary[Registry, type[Spec]] = weakref.WeakKeyDictionary()


def spec_model(registry: Registry) -> type[Spec]:
    """The Spec model typed by this registry's components (built once per registry)."""
    if registry not in _MODELS:
        _MODELS[registry] = specialize(Spec, registry)  # type: ignore[assignment]
    return _MODELS[registry]


# --- locating pydantic errors -----------------------------------------------------------


def _clean_path(loc: tuple, data: Any, missing: bool = False) -> tuple:
    """Drop pydantic's union tags from `loc` by walking the real data alongside it."""
    path: list = []
    node = data
    for i, part in enumerate(loc):
        if isinstance(node, dict):
            if part in node:
                path.append(part)
                node = node[part]
            elif missing and i == len(loc) - 1:
                path.append(part)  # the missing key itself
        elif isinstance(node, list):
            if isinstance(part, int) and 0 <= part < len(node):
                path.append(part)
                node = node[part]
        else:
            break  # a scalar: whatever follows is a union member's tag
    return tuple(path)


def _unwrap(tp: Any, value: Any) -> Any:
    """Strip Annotated/Optional and pick the discriminated member matching `value`."""
    while True:
        origin = typing.get_origin(tp)
        if origin is Annotated:
            tp = typing.get_args(tp)[0]
            continue
        if origin is Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
            members = [a for a in typing.get_args(tp) if a is not type(None)]
            models = [m for m in members if isinstance(m, type) and issubclass(m, BaseModel)]
            if isinstance(value, dict) and models:
                for m in models:
                    for key in ("name", "type"):
                        f = m.model_fields.get(key)
                        if f is not None and typing.get_args(f.annotation) == (value.get(key),):
                            return m
            tp = members[0] if len(members) == 1 else (models[0] if len(models) == 1 else None)
            if tp is None:
                return None
            continue
        return tp


def _model_at(root: type[BaseModel], path: tuple, data: Any) -> type[BaseModel] | None:
    """The pydantic model class that governs the mapping at `path`."""
    tp: Any = root
    node = data
    for part in path:
        tp = _unwrap(tp, node)
        if tp is None:
            return None
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            field = tp.model_fields.get(part) if isinstance(part, str) else None
            if field is None:
                return None
            tp = field.annotation
        else:
            args = typing.get_args(tp)
            if not args:
                return None
            tp = args[-1]  # list[X] / dict[str, X]
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            node = None
    tp = _unwrap(tp, node)
    return tp if isinstance(tp, type) and issubclass(tp, BaseModel) else None


def _kind_for_tags(registry: Registry, discriminator: str, expected: str) -> str | None:
    tags = {t.strip().strip("'") for t in expected.split(",")}
    for kind, (_, key) in KINDS.items():
        if key == discriminator.strip("'") and set(registry.names(kind)) == tags:
            return kind
    return None


def _issue(err: dict, data: Any, loaded: LoadedSpec, model: type[BaseModel], registry: Registry) -> SpecIssue:
    kind = err["type"]
    path = _clean_path(err["loc"], data, missing=kind == "missing")
    ctx = err.get("ctx", {})
    where = loaded.locate(path)
    if kind == "extra_forbidden":
        owner = _model_at(model, path[:-1], data)
        valid = [k for k in (owner.model_fields if owner else {})]
        guess = did_you_mean(str(path[-1]), valid)
        hint = f"did you mean {guess!r}?" if guess else (f"valid keys here: {', '.join(valid)}" if valid else None)
        return SpecIssue(path, f"unknown key {path[-1]!r}", hint, where)
    if kind == "missing":
        return SpecIssue(path, f"required key {path[-1]!r} is missing", "add it (see `llmforge schema` or docs/spec-reference.md)", where)
    if kind == "union_tag_invalid":
        comp_kind = _kind_for_tags(registry, ctx.get("discriminator", ""), ctx.get("expected_tags", ""))
        key = ctx.get("discriminator", "'name'").strip("'")
        msg = registry.unknown_message(comp_kind, ctx.get("tag")) if comp_kind else err["msg"]
        fix = "repair the plugin that is installed but not loaded" if registry.unloaded else "install the plugin that provides it"
        return SpecIssue((*path, key), msg, f"pick a registered {comp_kind or key}, or {fix}", loaded.locate((*path, key)))
    if kind == "union_tag_not_found":
        key = ctx.get("discriminator", "'name'").strip("'")
        return SpecIssue((*path, key), f"missing {key!r}: every component is chosen by {key}", f"add `{key}: <registered name>`; `llmforge plugins` lists them", where)
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    elif kind != "spec_conflict" and "input" in err and not isinstance(err["input"], (dict, list)):
        msg = f"{msg} (got {err['input']!r})"
    return SpecIssue(path, msg, None, where)


def _issues(exc: ValidationError, data: Any, loaded: LoadedSpec, model: type[BaseModel], registry: Registry) -> list[SpecIssue]:
    merged: dict[tuple, SpecIssue] = {}
    for err in exc.errors(include_url=False):
        issue = _issue(err, data, loaded, model, registry)
        prev = merged.get(issue.path)
        if prev is None:
            merged[issue.path] = issue
        elif issue.message not in prev.message:
            prev.message += f", or {issue.message[0].lower()}{issue.message[1:]}"  # union members
    # A misspelt required key also shows up as "missing": report the typo once.
    typos = {(i.path[:-1], i.hint) for i in merged.values() if i.message.startswith("unknown key")}
    return [
        i for i in merged.values()
        if not (i.message.startswith("required key") and (i.path[:-1], f"did you mean {i.path[-1]!r}?") in typos)
    ]


# --- entry point ------------------------------------------------------------------------


def _try(adapter: TypeAdapter, value: Any) -> Any:
    try:
        return adapter.validate_python(value)
    except ValidationError:
        return None


def validate_loaded(loaded: LoadedSpec, registry: Registry, *, check_inputs: bool = True) -> Spec:
    """Validate and cross-check; raises SpecError listing every issue found."""
    from llmforge.spec.checks import run_checks

    model = spec_model(registry)
    data = loaded.data
    issues: list[SpecIssue] = []
    spec = None
    try:
        spec = model.model_validate(data)
        sections = {name: getattr(spec, name) for name in model.model_fields}
    except ValidationError as e:
        issues += _issues(e, data, loaded, model, registry)
        sections = {}
        for name, field in model.model_fields.items():
            if name in data:
                value = data[name]
            elif not field.is_required():
                value = field.get_default(call_default_factory=True)  # an omitted section still has its checks
            else:
                continue
            try:
                sections[name] = TypeAdapter(field.annotation).validate_python(value)
            except ValidationError:
                if name == "stages" and isinstance(value, list):
                    # Keep the stages that parsed (None for the others) so their checks still run.
                    item = TypeAdapter(typing.get_args(field.annotation)[0])
                    sections[name] = [_try(item, x) for x in value]
    known = {i.path for i in issues}
    issues += [i for i in run_checks(sections, loaded, check_inputs=check_inputs) if i.path not in known]
    if issues:
        raise SpecError(issues)
    assert spec is not None
    return spec


def load_and_validate(path: str, overrides: list[str] | tuple[str, ...] = (), *, registry: Registry | None = None, check_inputs: bool = True) -> tuple[Spec, LoadedSpec]:
    """Load a spec file with overrides, validate it, and return (spec, loaded)."""
    from llmforge.registry.manager import get_registry
    from llmforge.spec.load import load_spec

    registry = registry or get_registry()
    loaded = load_spec(path, overrides)
    return validate_loaded(loaded, registry, check_inputs=check_inputs), loaded
