"""Named fault-injection points for the reliability suite (tests/fault/).

`LLMFORGE_FAULT=<point>[@<n>]` kills this process with SIGKILL the n-th time (default
first) it reaches `<point>`. Unset, a fault point costs one dict lookup.
"""

from __future__ import annotations

import os
import signal

_COUNTS: dict[str, int] = {}


def fault_point(name: str) -> None:
    spec = os.environ.get("LLMFORGE_FAULT")
    if not spec:
        return
    point, _, nth = spec.partition("@")
    if point != name:
        return
    _COUNTS[name] = _COUNTS.get(name, 0) + 1
    if _COUNTS[name] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
