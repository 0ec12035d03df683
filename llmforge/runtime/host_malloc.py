"""Keep glibc's malloc from handing a training step's memory back to the kernel (CPU runs).

torch's CPU tensors come from malloc. With glibc's defaults, freed memory at the top of the
heap beyond the (dynamic) trim threshold goes back to the kernel, and blocks above the
(dynamic) mmap threshold are mapped and unmapped one by one, so a step can fault its
activations in again page by page; on a virtual machine each fault is dear. llmforge's step
allocates in a pattern that trips this where the plain PyTorch loop's does not: `llmforge run`
of the shakespeare-char recipe, 500 steps, took 261,000–267,000 minor faults with glibc's
defaults and 142,000 with these settings (most of those are start-up), and 50.2 and 53.1 s
against 46.0 and 49.2 s, alternated; the reference loop takes ~79,000 either way and runs no
faster with them (44.2/44.6 s against 42.4/46.9 s). With an mmap threshold of 32 MiB (glibc's
own ceiling for its dynamic one) and a trim threshold of 256 MiB, a step reuses the previous
step's memory (issue 31, docs/performance.md). The price: up to 256 MiB freed at the heap's
top stays with the process, which a training loop reuses anyway; blocks above 32 MiB are
still mapped and returned at once.

Not applied where the user chose: a preloaded allocator (`LD_PRELOAD`, e.g. jemalloc or
tcmalloc), or glibc's own malloc settings in the environment (`MALLOC_*_`, `GLIBC_TUNABLES`).
"""

from __future__ import annotations

import ctypes
import os
import sys

MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 256 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
_state: dict[str, str | None] = {}


def user_choice(env: dict[str, str] | os._Environ = os.environ) -> str | None:
    """The allocator setting the user made in the environment, if any (then llmforge leaves malloc alone)."""
    if "malloc" in env.get("LD_PRELOAD", ""):  # jemalloc, tcmalloc, mimalloc
        return f"LD_PRELOAD={env['LD_PRELOAD']}"
    for key in sorted(env):
        if (key.startswith("MALLOC_") and key.endswith("_")) or (key == "GLIBC_TUNABLES" and "malloc" in env[key]):
            return f"{key}={env[key]}"
    return None


def keep_freed_memory() -> str | None:
    """Set glibc's mmap and trim thresholds once per process; returns what was done (None: nothing, and why not is
    in `skipped()`)."""
    if "done" in _state:
        return _state["done"]
    _state["done"] = None
    if not sys.platform.startswith("linux"):
        _state["skipped"] = "not Linux"
    elif (choice := user_choice()) is not None:
        _state["skipped"] = f"the environment sets {choice}"
    else:
        try:
            libc = ctypes.CDLL("libc.so.6")
            libc.gnu_get_libc_version  # noqa: B018  (glibc only: musl has no mallopt thresholds)
        except (OSError, AttributeError):
            _state["skipped"] = "not glibc"
            return None
        if libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1:
            _state["done"] = f"malloc keeps freed memory (mmap threshold {MMAP_THRESHOLD >> 20} MiB, trim threshold {TRIM_THRESHOLD >> 20} MiB)"
        else:
            _state["skipped"] = "mallopt refused the thresholds"
    return _state["done"]


def skipped() -> str | None:
    """Why `keep_freed_memory` left malloc alone (None when it did not, or was not called)."""
    return _state.get("skipped")
