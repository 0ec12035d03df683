"""The JSON Schema and the Markdown reference: generated from the models, never stale."""

from __future__ import annotations

import json
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel, Field

from llmforge.registry import Component, hookimpl
from llmforge.registry.manager import build_registry
from llmforge.spec.base import ComponentRef, StrictModel
from llmforge.spec.docs import REFERENCE_FILE, REGENERATE, SCHEMA_FILE, builtin_registry, json_schema, reference_markdown, schema_text
from llmforge.spec.schema import Spec

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize("target", [SCHEMA_FILE, REFERENCE_FILE], ids=lambda p: p.name)
def test_the_docs_match_the_models(target):
    registry = builtin_registry()
    fresh = schema_text(registry) if target == SCHEMA_FILE else reference_markdown(registry)
    assert target.exists() and target.read_text() == fresh, f"{target.relative_to(ROOT)} is stale; regenerate it with `{REGENERATE}`"


def _models(tp: typing.Any, seen: set) -> None:
    if isinstance(tp, type) and issubclass(tp, BaseModel) and not issubclass(tp, ComponentRef):
        if tp not in seen:
            seen.add(tp)
            for info in tp.model_fields.values():
                _models(info.annotation, seen)
    for arg in typing.get_args(tp):
        _models(arg, seen)


def test_every_field_of_every_model_has_a_description():
    registry = builtin_registry()
    models: set = set()
    _models(Spec, models)
    for kind in registry.entries.values():
        for reg in kind.values():
            _models(reg.typed_options, models)
    undocumented = [f"{m.__name__}.{name}" for m in models for name, info in m.model_fields.items() if not info.description]
    assert not undocumented, f"fields without Field(description=...): {undocumented}"
    assert all(issubclass(m, StrictModel) or m.model_config.get("extra") == "forbid" for m in models)


class Muon(StrictModel):
    """Orthogonalized momentum (a throwaway plugin component)."""

    lr: float = Field(0.02, gt=0, description="Learning rate for matrices.")


class MuonPlugin:
    @hookimpl
    def register_optimizers(self) -> list[Component]:
        return [Component("muon", Muon)]


def test_plugin_components_appear_in_the_schema_and_the_reference(monkeypatch):
    monkeypatch.setenv("LLMFORGE_DISABLE_PLUGIN_AUTOLOAD", "1")
    registry = build_registry([(MuonPlugin(), "llmforge-muon", "0.2")])
    schema = json_schema(registry)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    defs = schema["$defs"]
    muon = next(v for k, v in defs.items() if k.endswith("muon"))
    assert muon["properties"]["name"]["const"] == "muon" and muon["additionalProperties"] is False
    assert muon["properties"]["lr"]["exclusiveMinimum"] == 0
    markdown = reference_markdown(registry)
    assert "#### optimizer `muon`" in markdown
    assert "| `lr` | float, > 0 | `0.02` | Learning rate for matrices. |" in markdown


def test_the_reference_describes_sections_and_components():
    text = REFERENCE_FILE.read_text()
    for heading in ["## Top level", "### DataConfig", "### ParallelismConfig", "### TrainConfig", "#### model `gpt`",
                    "#### optimizer `adamw`", "#### stage `pretrain`"]:
        assert heading in text
    assert "| `tensor_model_parallel_size` | int, ≥ 1 | `1` |" in text


@pytest.mark.parametrize("spec", sorted((ROOT / "specs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_specs_point_editors_at_the_schema(spec):
    first = spec.read_text().splitlines()[0]
    assert first == "# yaml-language-server: $schema=../docs/spec.schema.json"
    assert json.loads((spec.parent / "../docs/spec.schema.json").read_text())["title"] == "llmforge spec"
