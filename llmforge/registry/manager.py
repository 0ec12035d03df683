"""The pluggy manager: built-ins first, then entry points of group `llmforge`.

`LLMFORGE_DISABLE_PLUGIN_AUTOLOAD=1` switches entry-point discovery off (as pytest's
PYTEST_DISABLE_PLUGIN_AUTOLOAD does). A plugin that fails to import costs one warning
line naming its distribution; commands that do not need it keep working.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import pluggy

from llmforge import __version__
from llmforge.registry import hookspecs
from llmforge.registry.components import KINDS, Registry

hookimpl = pluggy.HookimplMarker("llmforge")

ENTRY_POINT_GROUP = "llmforge"
AUTOLOAD_ENV = "LLMFORGE_DISABLE_PLUGIN_AUTOLOAD"

_CACHE: Registry | None = None


def _entry_point_plugins() -> tuple[list[tuple[Any, str, str]], list[str]]:
    from importlib.metadata import entry_points

    plugins, failures = [], []
    # Sorted, so that the registry (and a duplicate's message) does not depend on sys.path order.
    found = sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: (ep.dist.name if ep.dist else "", ep.name))
    for ep in found:
        dist = ep.dist.name if ep.dist else ep.value
        version = ep.dist.version if ep.dist else "?"
        try:
            plugins.append((ep.load(), dist, version))
        except Exception as e:  # a broken plugin must not take the CLI down with it
            failures.append(f"plugin {dist} {version} (entry point {ep.name!r} = {ep.value}) failed to import: {type(e).__name__}: {e}")
    return plugins, failures


def make_plugin_manager(extra_plugins: list[tuple[Any, str, str]] = ()) -> tuple[pluggy.PluginManager, dict[str, tuple[str, str]], list[str]]:
    """Manager with built-ins, entry-point plugins and `extra_plugins` (object, provider, version)."""
    from llmforge import builtins

    pm = pluggy.PluginManager("llmforge")
    pm.add_hookspecs(hookspecs)
    providers: dict[str, tuple[str, str]] = {}
    pm.register(builtins, name="llmforge.builtins")
    providers["llmforge.builtins"] = ("llmforge", __version__)
    failures: list[str] = []
    found: list[tuple[Any, str, str]] = []
    if os.environ.get(AUTOLOAD_ENV, "") not in ("1", "true", "yes"):
        found, failures = _entry_point_plugins()
    for plugin, dist, version in [*found, *extra_plugins]:
        name = f"{dist}:{getattr(plugin, '__name__', id(plugin))}"
        if pm.is_registered(plugin):
            continue
        try:
            pm.register(plugin, name=name)
            # A misspelt hook name would otherwise register nothing, silently.
            pm.check_pending()
        except pluggy.PluginValidationError as e:
            if pm.has_plugin(name):
                pm.unregister(name=name)
            failures.append(f"plugin {dist} {version} is invalid: {e}")
            continue
        providers[name] = (dist, version)
    return pm, providers, failures


def build_registry(extra_plugins: list[tuple[Any, str, str]] = ()) -> Registry:
    pm, providers, failures = make_plugin_manager(extra_plugins)
    registry = Registry()
    registry.failures = failures
    for kind, (hook_name, _) in KINDS.items():
        hook = getattr(pm.hook, hook_name)
        # Call each implementation ourselves (built-ins first) so every component knows its provider.
        for impl in hook.get_hookimpls():
            provider, version = providers.get(impl.plugin_name, (impl.plugin_name, "?"))
            try:
                components = impl.function() or []
            except Exception as e:  # one broken plugin must not take the CLI down with it
                failures.append(f"plugin {provider} {version}: {hook_name}() failed: {type(e).__name__}: {e}")
                continue
            for comp in components:
                registry.add(kind, comp, provider, version)
    return registry


def get_registry(*, warn: bool = True) -> Registry:
    """The process-wide registry (built once). Plugin import failures are printed once."""
    global _CACHE
    if _CACHE is None:
        _CACHE = build_registry()
        if warn:
            for line in _CACHE.failures:
                print(f"warning: {line}", file=sys.stderr)
    return _CACHE


def reset_registry() -> None:
    """Forget the cached registry (tests that install or fake plugins)."""
    global _CACHE
    _CACHE = None
