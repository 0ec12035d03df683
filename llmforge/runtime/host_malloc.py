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

Transparent huge pages: with the kernel's THP in `madvise` mode (the common default), malloc's
heap stays in 4 KiB pages unless glibc is told at start (`glibc.malloc.hugetlb=1`, glibc 2.35+),
and a step that walks ~40 MB of activations, weights and optimizer state takes a TLB miss every
few KiB. So `llmforge run` on a CPU machine re-executes itself once, before anything heavy is
imported, with those tunables (the thresholds above included) in `GLIBC_TUNABLES`
(`reexec_with_huge_pages`): side by side with the reference loop, llmforge's steady-state step
went from 1.027–1.039 to 0.996–1.006 of the reference's (benchmarks/side_by_side.py's rounds;
the same run without any of these settings read 1.043 of it with the thresholds alone). Child
processes (torchrun's ranks, prepare's workers) inherit the tunables. The reference loop
gains ~1% from the same tunables. `LLMFORGE_HUGE_PAGES=0` keeps the process as started.

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
# Set by llmforge itself, with GLIBC_TUNABLES, when it re-executes with them: the tunables are then ours, not the user's.
REEXEC_MARK = "LLMFORGE_MALLOC_TUNABLES"
TUNABLES = f"glibc.malloc.hugetlb=1:glibc.malloc.mmap_threshold={MMAP_THRESHOLD}:glibc.malloc.trim_threshold={TRIM_THRESHOLD}"
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def _glibc() -> ctypes.CDLL | None:
    """glibc's handle, None elsewhere (musl has neither mallopt's thresholds nor the tunables)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
    except (OSError, AttributeError):
        return None
    return libc


def _glibc_version() -> tuple[int, int] | None:
    libc = _glibc()
    try:
        major, minor = libc.gnu_get_libc_version().decode().split(".")[:2]
        return int(major), int(minor)
    except (AttributeError, ValueError):  # AttributeError: no glibc (None)
        return None


def _thp_mode() -> str | None:
    """The kernel's THP mode (`always`, `madvise`, `never`), None where it cannot be read."""
    try:
        text = open(THP_SETTING).read()
    except OSError:
        return None
    return text[text.index("[") + 1 : text.index("]")] if "[" in text else None


def huge_pages_env(env: dict[str, str] | os._Environ, *, thp: str | None, glibc: tuple[int, int] | None,
                   gpu: bool) -> dict[str, str] | None:
    """The environment to re-execute `llmforge run` with (glibc's tunables), or None to run as started."""
    if env.get(REEXEC_MARK) or env.get("LLMFORGE_HUGE_PAGES") == "0" or user_choice(env) is not None:
        return None
    if gpu or thp not in ("always", "madvise") or glibc is None or glibc < (2, 35):
        return None  # GPU hosts keep their process as it is; no THP, or a glibc without the hugetlb tunable
    return {**env, "GLIBC_TUNABLES": TUNABLES, REEXEC_MARK: "1"}


def reexec_with_huge_pages() -> None:
    """Replace this process, once, by the same command with glibc's malloc tunables (see the module's doc).

    Only from the command line's own entry point (never a `main(argv)` called in a process that
    has other work), before torch is imported: nothing is lost but the interpreter's start.
    """
    if not sys.platform.startswith("linux"):
        return
    gpu = any(name.startswith("nvidia") and name[6:].isdigit() for name in os.listdir("/dev")) if os.path.isdir("/dev") else False
    env = huge_pages_env(os.environ, thp=_thp_mode(), glibc=_glibc_version(), gpu=gpu)
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, list(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv]), env)


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
    # After our own re-exec GLIBC_TUNABLES is ours (glibc may rewrite it to the entries it keeps): set the thresholds anyway.
    ours = bool(os.environ.get(REEXEC_MARK))
    if not sys.platform.startswith("linux"):
        _state["skipped"] = "not Linux"
    elif not ours and (choice := user_choice()) is not None:
        _state["skipped"] = f"the environment sets {choice}"
    else:
        libc = _glibc()
        if libc is None:
            _state["skipped"] = "not glibc"
            return None
        if libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1:
            _state["done"] = (f"malloc keeps freed memory (mmap threshold {MMAP_THRESHOLD >> 20} MiB, trim threshold {TRIM_THRESHOLD >> 20} MiB)"
                              + (" in transparent huge pages" if ours else ""))
        else:
            _state["skipped"] = "mallopt refused the thresholds"
    return _state["done"]


def skipped() -> str | None:
    """Why `keep_freed_memory` left malloc alone (None when it did not, or was not called)."""
    return _state.get("skipped")
