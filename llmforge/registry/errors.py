"""Errors from plugin code, reported as one line naming the component and its provider.

A plugin's factory that raises is wrapped by `Registry.build` (`PluginError`); an exception
raised later, while llmforge calls a plugin's component (a source's iteration, a schedule,
an optimizer's step, a callback), is traced to the component through its traceback's frames
(`plugin_failure`). Bad input, a `UserError`, pydantic's `ValidationError` or `OptionsError`,
exits 2; anything else is a bug in the plugin and exits 1. Built-in components are not
wrapped: their tracebacks are llmforge's bugs. Evaluators never stop a run (runtime/training.py).
"""

from __future__ import annotations

import sys
import time
import traceback
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from llmforge.spec.errors import UserError

if TYPE_CHECKING:
    from llmforge.registry.components import Registered, Registry


class OptionsError(UserError):
    """Options a factory refuses that `validate` could not judge (a file's contents, the machine): exit 2."""


def is_bad_input(error: BaseException) -> bool:
    from pydantic import ValidationError

    return isinstance(error, (UserError, ValidationError))


def one_line(error: BaseException) -> str:
    """`Type: message`, on one line (a ValidationError's first error, a UserError's hint after ';')."""
    from pydantic import ValidationError

    if isinstance(error, ValidationError) and error.errors():
        first = error.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        text = f"{where}: {first['msg']}" if where else first["msg"]
    else:
        text = "; ".join(line.strip() for line in str(error).splitlines() if line.strip())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


class PluginError(Exception):
    """An exception raised by a plugin's component, with the component it came from."""

    def __init__(self, reg: Registered, error: BaseException, doing: str):
        self.reg, self.error, self.doing = reg, error, doing
        super().__init__(self.line)

    @property
    def line(self) -> str:
        r = self.reg
        return f"{r.kind} {r.component.name!r} ({r.provider} {r.version}) failed {self.doing}: {one_line(self.error)}"

    @property
    def exit_code(self) -> int:
        return 2 if is_bad_input(self.error) else 1


def _factory_module(reg: Registered) -> str | None:
    factory = reg.component.factory
    if isinstance(factory, str):
        return factory.partition(":")[0]
    return getattr(factory, "__module__", None)


def _factory_name(reg: Registered) -> str:
    factory = reg.component.factory
    return factory.partition(":")[2] if isinstance(factory, str) else getattr(factory, "__qualname__", "")


def _frames(tb: TracebackType | None) -> list[tuple[str, str]]:
    """(module, qualified function name) of each frame, outermost first."""
    frames = []
    while tb is not None:
        code = tb.tb_frame.f_code
        frames.append((tb.tb_frame.f_globals.get("__name__", ""), getattr(code, "co_qualname", code.co_name)))
        tb = tb.tb_next
    return frames


def plugin_failure(error: BaseException, registry: Registry) -> PluginError | None:
    """The plugin component an exception came from, or None when no plugin's code is on its traceback."""
    if isinstance(error, PluginError):
        return error
    plugins = [r for kind in registry.entries.values() for r in kind.values() if r.provider != "llmforge" and _factory_module(r)]
    if not plugins:
        return None
    # The deepest frame in a plugin's code: inside its factory's own function or class, else its
    # factory's module, else the plugin's package.
    for module, function in reversed(_frames(error.__traceback__)):
        exact = [r for r in plugins if _factory_module(r) == module]
        inside = [r for r in exact if function.split(".")[0] == _factory_name(r).split(".")[0]]
        package = [r for r in plugins if _factory_module(r).split(".")[0] == module.split(".")[0]]
        if inside or exact or package:
            return PluginError((inside or exact or package)[0], error, "while running")
    return None


def report(failure: PluginError, run_log: Path | None) -> int:
    """Print the one line (the traceback goes to `run_log`); return the exit code."""
    if run_log is not None and run_log.parent.is_dir():
        with open(run_log, "a") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} error: {failure.line}\n")
            f.write("".join(traceback.format_exception(failure.error)))
    where = f" (traceback in {run_log})" if run_log is not None and run_log.exists() else ""
    print(f"error: {failure.line}{where}", file=sys.stderr, flush=True)
    return failure.exit_code
