"""The hook specs, the component kinds and docs/plugins.md stay in step."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

from llmforge import builtins
from llmforge.registry import hookspecs
from llmforge.registry.components import KINDS

ROOT = Path(__file__).resolve().parents[3]


def hook_names() -> list[str]:
    return [name for name, fn in inspect.getmembers(hookspecs, inspect.isfunction) if name.startswith("register_")]


def test_every_kind_has_a_hook_and_every_hook_a_kind():
    assert sorted(hook for hook, _ in KINDS.values()) == sorted(hook_names())


def test_every_hook_has_a_docstring_with_its_factory_contract():
    for name in hook_names():
        doc = inspect.getdoc(getattr(hookspecs, name)) or ""
        assert "Factory:" in doc, f"{name} does not document its factory"


def test_every_hook_is_documented_in_the_plugin_guide():
    guide = (ROOT / "docs" / "plugins.md").read_text()
    headings = set(re.findall(r"^### `(register_\w+)`$", guide, flags=re.M))
    missing = sorted(set(hook_names()) - headings)
    assert not missing, f"docs/plugins.md has no '### `hook`' section for: {', '.join(missing)}"
    assert "LLMFORGE_DISABLE_PLUGIN_AUTOLOAD" in guide and "[project.entry-points.llmforge]" in guide


def test_builtins_only_implement_hooks_that_exist():
    implemented = [name for name, _ in inspect.getmembers(builtins, inspect.isfunction) if name.startswith("register_")]
    assert implemented and set(implemented) <= set(hook_names())
