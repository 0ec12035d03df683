"""The pluggy manager: built-ins first, then entry points of group `llmforge`.

`LLMFORGE_DISABLE_PLUGIN_AUTOLOAD=1` switches entry-point discovery off (as pytest's
PYTEST_DISABLE_PLUGIN_AUTOLOAD does); `LLMFORGE_DISABLE_PLUGINS=name[,name]` skips single
plugins by entry-point or distribution name (as pytest's `-p no:name`). A plugin that fails
to import, or that declares a plugin API (`LLMFORGE_API`) this llmforge does not speak,
costs one warning line naming its distribution; commands that do not need it keep working.
A hook name no spec declares (a misspelling) stops every command: the plugin's good hooks
would otherwise be lost with it, or the bad one ignored.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import pluggy

from llmforge import __version__
from llmforge.registry import hookspecs
from llmforge.registry.components import KINDS, Registry, RegistryError
from llmforge.spec.errors import did_you_mean

hookimpl = pluggy.HookimplMarker("llmforge")

ENTRY_POINT_GROUP = "llmforge"
AUTOLOAD_ENV = "LLMFORGE_DISABLE_PLUGIN_AUTOLOAD"
DISABLE_ENV = "LLMFORGE_DISABLE_PLUGINS"
# The plugin API this llmforge speaks (`llmforge.plugin`); a plugin may require a range of it
# with `LLMFORGE_API = ">=1,<2"` in its hooks module.
API_VERSION = "1.1"  # 1.1: model factories may be given `fp8` (FACTORY_OPTIONAL_KEYWORDS)

_CACHE: Registry | None = None


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.strip().split("."))


def api_mismatch(requirement: str, have: str = API_VERSION) -> str | None:
    """Why `have` does not satisfy `requirement` (">=1,<2": comma-separated comparisons), or None."""
    ops = {">=": lambda a, b: a >= b, "<=": lambda a, b: a <= b, "==": lambda a, b: a == b, "!=": lambda a, b: a != b,
           ">": lambda a, b: a > b, "<": lambda a, b: a < b}
    for clause in str(requirement).split(","):
        clause = clause.strip()
        op = next((o for o in ops if clause.startswith(o)), None)
        try:
            want = _version(clause[len(op):]) if op else None
        except ValueError:
            want = None
        if want is None:
            return f"LLMFORGE_API = {requirement!r} is not a version range like '>=1,<2'"
        width = max(len(want), len(_version(have)))
        pad = lambda v: v + (0,) * (width - len(v))  # noqa: E731
        mine = _version(have)
        if op in ("==", "!="):  # "==1" is any 1.x: compare the components the requirement names
            mine, width = mine[:len(want)], len(want)
        if not ops[op](pad(mine), pad(want)):
            return f"it needs the llmforge plugin API {requirement}, and this llmforge speaks {have}"
    return None


def _normalized(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def disabled_names() -> set[str]:
    return {_normalized(n) for n in os.environ.get(DISABLE_ENV, "").split(",") if n.strip()}


def _entry_point_plugins() -> tuple[list[tuple[Any, str, str]], list[str], list[str]]:
    """(plugins loaded, warning lines, plugins installed but not loaded)."""
    from importlib.metadata import entry_points

    plugins, failures, unloaded = [], [], []
    off = disabled_names()
    # Sorted, so that the registry (and a duplicate's message) does not depend on sys.path order.
    found = sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: (ep.dist.name if ep.dist else "", ep.name))
    for ep in found:
        dist = ep.dist.name if ep.dist else ep.value
        version = ep.dist.version if ep.dist else "?"
        if _normalized(ep.name) in off or _normalized(dist) in off:
            continue
        where = f"{dist} {version} (entry point {ep.name!r} = {ep.value})"
        try:
            plugin = ep.load()
        except Exception as e:  # a broken plugin must not take the CLI down with it
            why = f"{where} failed to import: {type(e).__name__}: {e}"
        else:
            mismatch = api_mismatch(plugin.LLMFORGE_API) if hasattr(plugin, "LLMFORGE_API") else None
            if mismatch is None:
                plugins.append((plugin, dist, version))
                continue
            why = f"{where} is refused: {mismatch}"
        failures.append(f"plugin {why}; switch it off with {DISABLE_ENV}={dist}")
        unloaded.append(why)
    return plugins, failures, unloaded


def _check_hook_names(pm: pluggy.PluginManager, plugin: Any, dist: str, version: str) -> None:
    """A hook no spec declares is a misspelling: stop, naming it, rather than lose or ignore it."""
    known = [name for name in dir(hookspecs) if name.startswith("register_")]
    for attr in dir(plugin):
        if attr in known or pm.parse_hookimpl_opts(plugin, attr) is None:
            continue
        guess = did_you_mean(attr, known)
        raise RegistryError(f"plugin {dist} {version} implements {attr!r}, which is no llmforge hook"
                            + (f"; did you mean {guess!r}?" if guess else f" (hooks: {', '.join(known)})")
                            + f" Fix the plugin, or switch it off with {DISABLE_ENV}={dist}")


def make_plugin_manager(
    extra_plugins: list[tuple[Any, str, str]] = (),
) -> tuple[pluggy.PluginManager, dict[str, tuple[str, str]], list[str], list[str]]:
    """Manager with built-ins, entry-point plugins and `extra_plugins` (object, provider, version).

    Returns the manager, plugin name → (provider, version), warning lines, and the installed
    plugins that were not loaded (with why).
    """
    from llmforge import builtins

    pm = pluggy.PluginManager("llmforge")
    pm.add_hookspecs(hookspecs)
    providers: dict[str, tuple[str, str]] = {}
    pm.register(builtins, name="llmforge.builtins")
    providers["llmforge.builtins"] = ("llmforge", __version__)
    failures: list[str] = []
    unloaded: list[str] = []
    found: list[tuple[Any, str, str]] = []
    if os.environ.get(AUTOLOAD_ENV, "") not in ("1", "true", "yes"):
        found, failures, unloaded = _entry_point_plugins()
    for plugin, dist, version in [*found, *extra_plugins]:
        name = f"{dist}:{getattr(plugin, '__name__', id(plugin))}"
        if pm.is_registered(plugin):
            continue
        _check_hook_names(pm, plugin, dist, version)
        try:
            pm.register(plugin, name=name)
        except pluggy.PluginValidationError as e:
            raise RegistryError(f"plugin {dist} {version} is invalid: {e}. Fix the plugin, or switch it off with "
                                f"{DISABLE_ENV}={dist}") from None
        providers[name] = (dist, version)
    return pm, providers, failures, unloaded


def build_registry(extra_plugins: list[tuple[Any, str, str]] = ()) -> Registry:
    pm, providers, failures, unloaded = make_plugin_manager(extra_plugins)
    registry = Registry()
    registry.failures = failures
    registry.unloaded = unloaded
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
