"""Turn the static spec models into ones typed by the registry's components.

A field typed `OptimizerRef` becomes `Annotated[adamw | sgd | lion, discriminator='name']`
where each member is that component's own options model, so pydantic validates the
options of whatever a plugin registered, and `llmforge schema` documents them.
"""

from __future__ import annotations

import copy
import types
import typing
from typing import Annotated, Any, Union

from pydantic import AfterValidator, BaseModel, Field, create_model
from pydantic.fields import FieldInfo

from llmforge.registry.components import Registry
from llmforge.spec.base import ComponentRef, field_error


def component_union(ref: type[ComponentRef], registry: Registry, cache: dict) -> Any:
    # Members may hold placeholders themselves (a stage's train.optimizer), so specialize them too.
    members = [specialize(r.typed_options, registry, cache) for _, r in sorted(registry.entries[ref.kind].items())]
    if not members:
        # Nothing of this kind is registered: any name is unknown. Without this the
        # placeholder (extra="allow") would accept and silently ignore the entry.
        def unknown(value: ComponentRef) -> ComponentRef:
            message = registry.unknown_message(ref.kind, value.name) + "; install a plugin that provides one"
            raise field_error(ref, ref.discriminator, value.name, message)

        return Annotated[ref, AfterValidator(unknown)]
    return Annotated[Union[tuple(members)], Field(discriminator=ref.discriminator)]  # noqa: UP007


def _rewrite(tp: Any, registry: Registry, cache: dict) -> Any:
    if isinstance(tp, type) and issubclass(tp, ComponentRef):
        return component_union(tp, registry, cache)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return specialize(tp, registry, cache)
    origin = typing.get_origin(tp)
    if origin is None:
        return tp
    args = typing.get_args(tp)
    if origin is Annotated:
        return Annotated[(_rewrite(args[0], registry, cache), *args[1:])]  # type: ignore[misc]
    new_args = tuple(_rewrite(a, registry, cache) for a in args)
    if new_args == args:
        return tp
    if origin in (Union, types.UnionType):
        return Union[new_args]  # noqa: UP007
    if origin is typing.Literal:
        return tp
    return origin[new_args] if len(new_args) > 1 else origin[new_args[0]]


def specialize(cls: type[BaseModel], registry: Registry, cache: dict | None = None) -> type[BaseModel]:
    """`cls` with every component placeholder below it replaced by the registered union."""
    cache = {} if cache is None else cache
    if cls in cache:
        return cache[cls]
    cache[cls] = cls  # guards recursion; replaced below if anything changed
    overrides: dict[str, Any] = {}
    for fname, finfo in cls.model_fields.items():
        new_tp = _rewrite(finfo.annotation, registry, cache)
        if new_tp is not finfo.annotation:
            info = copy.copy(finfo)
            if typing.get_origin(new_tp) is Annotated:
                # A discriminator given inside Annotated is lost once the FieldInfo is
                # replaced, so move it onto the field itself.
                inner, *meta = typing.get_args(new_tp)
                for m in meta:
                    if isinstance(m, FieldInfo) and m.discriminator:
                        info.discriminator = m.discriminator
                        new_tp = inner
            info.annotation = new_tp
            overrides[fname] = (new_tp, info)
    if overrides:
        cache[cls] = create_model(cls.__name__, __base__=cls, __module__=cls.__module__, __doc__=cls.__doc__, **overrides)
    return cache[cls]
