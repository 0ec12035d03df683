"""What to do with bad input: stop with the file, shard or sample named, or skip and count."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from llmforge.spec.errors import UserError

SKIP_HINT = "or set data.on_error: skip to skip and count such input"

# Beyond this many, skips are only counted: a corpus with 10^5 bad lines must not flood the log.
_LOGGED_SKIPS = 10


class ErrorPolicy:
    """`data.on_error`: `raise` a UserError naming the place, or `skip`, log and count."""

    def __init__(self, mode: Literal["raise", "skip"] = "raise", log: Callable[[str], None] | None = print) -> None:
        self.mode = mode
        self.log = log
        self.skipped = 0

    def bad(self, where: str, problem: str, hint: str) -> None:
        """Report bad input at `where` (a file, file:line, shard or shard:sample)."""
        if self.mode == "raise":
            raise UserError(f"{where}: {problem}", f"{hint}, {SKIP_HINT}")
        self.skipped += 1
        if self.log is not None and self.skipped <= _LOGGED_SKIPS:
            more = " (further skips are only counted)" if self.skipped == _LOGGED_SKIPS else ""
            self.log(f"warning: skipped {where}: {problem}{more}")
