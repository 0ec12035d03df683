"""The spec's JSON Schema and Markdown reference, generated from the same pydantic models.

`llmforge schema` prints the schema with every installed plugin's components. The copies
in docs/ hold the built-ins only, so that they do not depend on the writer's machine;
regenerate both with `python -m llmforge.spec.docs` (a test fails when they are stale), which
is `LLMFORGE_DISABLE_PLUGIN_AUTOLOAD=1 llmforge schema [--markdown] --output docs/...` for both.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import annotated_types as at
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from llmforge.registry.components import KINDS, Registry
from llmforge.spec.base import ComponentRef
from llmforge.spec.schema import Spec

JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
DOCS_DIR = Path(__file__).resolve().parents[2] / "docs"
SCHEMA_FILE = DOCS_DIR / "spec.schema.json"
REFERENCE_FILE = DOCS_DIR / "spec-reference.md"
REGENERATE = "python -m llmforge.spec.docs"


def json_schema(registry: Registry) -> dict[str, Any]:
    """The JSON Schema of a spec whose components are this registry's."""
    from llmforge.spec.validate import spec_model

    schema = spec_model(registry).model_json_schema()
    schema["title"] = "llmforge spec"
    return {"$schema": JSON_SCHEMA_DIALECT, **schema}


def schema_text(registry: Registry) -> str:
    return json.dumps(json_schema(registry), indent=2, ensure_ascii=False) + "\n"


# --- Markdown -----------------------------------------------------------------------------


def _anchor(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _prose(text: str) -> str:
    """Escape `<` outside code spans, so that `runs/<name>` is not swallowed as an HTML tag."""
    parts = text.split("`")
    return "`".join(p if i % 2 else p.replace("<", "&lt;") for i, p in enumerate(parts))


def _cell(text: str) -> str:
    return _prose(text).replace("|", "\\|").replace("\n", " ")


def _first_paragraph(doc: str | None) -> str:
    return _prose((doc or "").strip().split("\n\n")[0].replace("\n", " ").strip())


def _value(value: Any) -> str:
    if isinstance(value, BaseModel):
        value = value.model_dump()
    if isinstance(value, tuple):
        value = list(value)
    return f"`{json.dumps(value, ensure_ascii=False)}`"


class _Reference:
    """Walks the models once, collecting one section per model class it reaches."""

    def __init__(self, registry: Registry):
        self.registry = registry
        self.queue: list[type[BaseModel]] = []

    def model_link(self, cls: type[BaseModel]) -> str:
        if cls not in self.queue:
            self.queue.append(cls)
        return f"[{cls.__name__}](#{_anchor(cls.__name__)})"

    def type_text(self, tp: Any) -> str:
        if tp is type(None):
            return "null"
        if isinstance(tp, type) and issubclass(tp, ComponentRef):
            return f"[{tp.kind}](#{_anchor('kind ' + tp.kind)}) component"
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            return self.model_link(tp)
        if isinstance(tp, type):
            return tp.__name__
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if origin is Annotated:
            return self.type_text(args[0])
        if origin is Literal:
            return " or ".join(f"`{a}`" for a in args)
        if origin in (Union, types.UnionType):
            return " or ".join(self.type_text(a) for a in args)
        if origin is list:
            return f"list of {self.type_text(args[0])}"
        if origin is dict:
            return f"map of {self.type_text(args[0])} to {self.type_text(args[1])}"
        if origin is tuple:
            return "[" + ", ".join(self.type_text(a) for a in args) + "]"
        return str(tp)

    @staticmethod
    def constraints(info: FieldInfo) -> list[str]:
        out = []
        symbols = {at.Ge: ("ge", "≥"), at.Gt: ("gt", ">"), at.Le: ("le", "≤"), at.Lt: ("lt", "<")}
        for meta in info.metadata:
            for cls, (attr, symbol) in symbols.items():
                if isinstance(meta, cls):
                    out.append(f"{symbol} {getattr(meta, attr)}")
            if isinstance(meta, at.MinLen) and meta.min_length:
                out.append(f"length ≥ {meta.min_length}")
            if getattr(meta, "pattern", None):
                out.append(f"matches `{meta.pattern}`")
        return out

    @staticmethod
    def default(info: FieldInfo) -> str:
        if info.is_required():
            return "**required**"
        if info.default_factory is not None:
            return _value(info.default_factory())  # type: ignore[call-arg]
        return _value(None if info.default is PydanticUndefined else info.default)

    def table(self, cls: type[BaseModel], first: str | None = None) -> list[str]:
        fields = list(cls.model_fields.items())
        if first is not None:
            fields.sort(key=lambda item: item[0] != first)
        lines = ["| key | type | default | description |", "|---|---|---|---|"]
        for name, info in fields:
            kind = ", ".join([self.type_text(info.annotation), *self.constraints(info)])
            lines.append(f"| `{name}` | {_cell(kind)} | {_cell(self.default(info))} | {_cell(info.description or '')} |")
        return lines

    def model_section(self, cls: type[BaseModel], done: set[type[BaseModel]]) -> list[str]:
        """The section of `cls`, then (depth first) those of the models it is the first to link."""
        done.add(cls)
        seen = len(self.queue)
        lines = [f'<a id="{_anchor(cls.__name__)}"></a>', "", f"### {cls.__name__}", "", _first_paragraph(cls.__doc__), "", *self.table(cls), ""]
        for nested in self.queue[seen:]:
            if nested not in done:
                lines += self.model_section(nested, done)
        return lines

    def drain(self, done: set[type[BaseModel]]) -> list[str]:
        lines: list[str] = []
        while pending := [c for c in self.queue if c not in done]:
            lines += self.model_section(pending[0], done)
        return lines

    def render(self) -> str:
        lines = [
            "# Spec reference",
            "",
            f"<!-- Generated from the spec models by `{REGENERATE}`; do not edit by hand. -->",
            "",
            "Every key of an llmforge spec, with its type, default and meaning. `llmforge validate` rejects unknown keys "
            "and values outside these types. Components are chosen by `name` (stage types by `type`) and bring their own "
            "options, listed under [Components](#components). This page lists the built-in components; "
            "`llmforge schema` prints the JSON Schema including installed plugins, and `llmforge plugins` lists them.",
            "",
            "Editors that use the YAML language server complete and check a spec that starts with "
            "`# yaml-language-server: $schema=../docs/spec.schema.json` (the path is relative to the spec).",
            "",
            "## Top level",
            "",
            _first_paragraph(Spec.__doc__),
            "",
            *self.table(Spec),
            "",
            "## Sections",
            "",
        ]
        done: set[type[BaseModel]] = {Spec}
        lines += self.drain(done)
        lines += ["## Components", ""]
        for kind, (hook, key) in KINDS.items():
            entries = sorted(self.registry.entries[kind].items())
            lines += [f'<a id="{_anchor("kind " + kind)}"></a>', "", f"### {kind}", ""]
            if not entries:
                lines += [f"No built-in {kind}; plugins add them through `{hook}`.", ""]
                continue
            lines += [f"Chosen by `{key}`: " + ", ".join(f"[`{name}`](#{_anchor(f'{kind} {name}')})" for name, _ in entries) + ".", ""]
            for name, reg in entries:
                summary = _first_paragraph(reg.typed_options.__doc__) or reg.component.description
                lines += [f'<a id="{_anchor(f"{kind} {name}")}"></a>', "", f"#### {kind} `{name}`", "", summary, ""]
                lines += [*self.table(reg.typed_options, first=key), ""]
        if self.queue and any(c not in done for c in self.queue):
            lines += ["## Option groups", "", "Models nested in the components' options.", ""]
            lines += self.drain(done)
        return "\n".join(lines).rstrip() + "\n"


def reference_markdown(registry: Registry) -> str:
    """docs/spec-reference.md: every section and component option, from the models."""
    return _Reference(registry).render()


def write_atomic(path: str | os.PathLike, text: str) -> None:
    """Write, fsync, rename: a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def builtin_registry() -> Registry:
    """The registry without entry-point plugins: what docs/ describes."""
    from llmforge.registry.manager import AUTOLOAD_ENV, build_registry

    saved = os.environ.get(AUTOLOAD_ENV)
    os.environ[AUTOLOAD_ENV] = "1"
    try:
        return build_registry()
    finally:
        if saved is None:
            del os.environ[AUTOLOAD_ENV]
        else:
            os.environ[AUTOLOAD_ENV] = saved


def main() -> None:
    registry = builtin_registry()
    write_atomic(SCHEMA_FILE, schema_text(registry))
    write_atomic(REFERENCE_FILE, reference_markdown(registry))
    print(f"wrote {os.path.relpath(SCHEMA_FILE)} and {os.path.relpath(REFERENCE_FILE)}")


if __name__ == "__main__":
    main()
