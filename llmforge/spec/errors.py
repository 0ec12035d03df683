"""Located spec errors: every problem names the dotted path, file:line:col, and the fix."""

from __future__ import annotations

import re
from dataclasses import dataclass, field


def dotted(path: tuple[str | int, ...]) -> str:
    """('stages', 1, 'train', 'lr') -> 'stages[1].train.lr' (the form users see in messages)."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not re.fullmatch(r"[\w-]+", str(part)):
            out += f"[{str(part)!r}]"  # a key with dots or spaces would read as several keys
        else:
            out += ("." if out else "") + str(part)
    return out or "<spec>"


@dataclass
class SpecIssue:
    """One problem with a spec. `location` is 'file:line:col' or "override 'k=v'"."""

    path: tuple[str | int, ...]
    message: str
    hint: str | None = None
    location: str | None = None

    def format(self) -> str:
        where = f"{self.location} " if self.location else ""
        text = f"{where}{dotted(self.path)}: {self.message}"
        if self.hint:
            text += f"\n    hint: {self.hint}"
        return text


@dataclass
class SpecError(Exception):
    """Raised for bad input; the CLI prints every issue and exits 2."""

    issues: list[SpecIssue] = field(default_factory=list)

    def __str__(self) -> str:
        n = len(self.issues)
        head = f"{n} problem{'s' if n != 1 else ''} in the spec:"
        return "\n".join([head, *("  " + i.format().replace("\n", "\n  ") for i in self.issues)])


class UserError(Exception):
    """Bad input outside the spec (a run dir in use, a missing checkpoint...): exit 2, no traceback."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint

    def __str__(self) -> str:
        text = super().__str__()
        return f"{text}\n  hint: {self.hint}" if self.hint else text


def did_you_mean(word: str, choices: list[str] | tuple[str, ...]) -> str | None:
    import difflib

    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return close[0] if close else None
