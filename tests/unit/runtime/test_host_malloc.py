"""CPU runs keep glibc's malloc from re-faulting each step's memory (runtime.host_malloc, issue 31)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from llmforge.runtime.host_malloc import user_choice

# A step's worth of allocations, shaped like the shakespeare-char step's activations (0.1-3 MB
# tensors, forward temporaries freed early, then the backward's): the minor page faults per
# round, counted after warm-up rounds (the heap grows to its working size over the first ones).
CHILD = """
import resource, sys, torch
from llmforge.runtime import host_malloc
if sys.argv[1] == "keep":
    assert host_malloc.keep_freed_memory(), host_malloc.skipped()
SIZES = [393216, 1572864, 98304, 3145728, 393216, 196608, 1572864, 786432] * 6
def round_():
    held = [torch.empty(n // 4).fill_(1) for n in SIZES]
    for i in range(0, len(held), 2):
        held[i] = None
    extra = [torch.empty(n // 4).fill_(1) for n in SIZES[::3]]
    del held, extra
for _ in range(5):
    round_()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    round_()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20)
"""


def _faults(mode: str, **env) -> float:
    import os

    done = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"} | env)
    assert done.returncode == 0, done.stderr[-2000:]
    return float(done.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc thresholds are Linux-only")
def test_kept_memory_is_reused_without_page_faults():
    default, kept = _faults("default"), _faults("keep")
    # glibc's defaults: memory returned and re-faulted every round (2,600-3,800 pages here); kept: 40-50
    assert kept < 150 and default > 10 * kept, (default, kept)


def test_the_users_own_allocator_settings_are_left_alone():
    assert user_choice({}) is None
    assert user_choice({"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}).startswith("LD_PRELOAD")
    assert user_choice({"LD_PRELOAD": "/usr/lib/libfaketime.so"}) is None
    assert user_choice({"MALLOC_ARENA_MAX": "2"}) is None  # not glibc's spelling (it ends in _)
    assert user_choice({"MALLOC_TRIM_THRESHOLD_": "0"}) == "MALLOC_TRIM_THRESHOLD_=0"
    assert user_choice({"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=1"}).startswith("GLIBC_TUNABLES")
    assert user_choice({"GLIBC_TUNABLES": "glibc.rtld.nns=2"}) is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_a_user_setting_wins():
    code = ("from llmforge.runtime import host_malloc\n"
            "assert host_malloc.keep_freed_memory() is None\n"
            "print(host_malloc.skipped())\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "MALLOC_TRIM_THRESHOLD_": "131072"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "MALLOC_TRIM_THRESHOLD_=131072" in done.stdout


def test_huge_pages_are_asked_for_only_where_they_apply():
    from llmforge.runtime.host_malloc import REEXEC_MARK, TUNABLES, huge_pages_env

    env = huge_pages_env({"PATH": "/bin"}, thp="madvise", glibc=(2, 36), gpu=False)
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": TUNABLES, REEXEC_MARK: "1"}
    assert "glibc.malloc.hugetlb=1" in TUNABLES and "mmap_threshold=33554432" in TUNABLES
    assert huge_pages_env({}, thp="always", glibc=(2, 35), gpu=False) is not None
    for blocked in ({REEXEC_MARK: "1"}, {"LLMFORGE_HUGE_PAGES": "0"}, {"MALLOC_TOP_PAD_": "0"},
                    {"GLIBC_TUNABLES": "glibc.malloc.tcache_count=0"}, {"LD_PRELOAD": "libtcmalloc.so"}):
        assert huge_pages_env(blocked, thp="madvise", glibc=(2, 36), gpu=False) is None, blocked
    assert huge_pages_env({}, thp="never", glibc=(2, 36), gpu=False) is None
    assert huge_pages_env({}, thp=None, glibc=(2, 36), gpu=False) is None
    assert huge_pages_env({}, thp="madvise", glibc=(2, 34), gpu=False) is None  # no hugetlb tunable before 2.35
    assert huge_pages_env({}, thp="madvise", glibc=None, gpu=False) is None  # musl
    assert huge_pages_env({}, thp="madvise", glibc=(2, 36), gpu=True) is None


def test_the_command_line_run_reexecutes_once_with_the_tunables(tmp_path):
    """`llmforge run` from the command line replaces itself (same pid) once, with the tunables; main(argv) never does."""
    from llmforge.runtime import host_malloc

    env = {k: v for k, v in __import__("os").environ.items()
           if not k.startswith("MALLOC_") and k not in ("GLIBC_TUNABLES", "LD_PRELOAD", host_malloc.REEXEC_MARK, "LLMFORGE_HUGE_PAGES")}
    if host_malloc.huge_pages_env(env, thp=host_malloc._thp_mode(), glibc=host_malloc._glibc_version(), gpu=False) is None:
        pytest.skip("no transparent huge pages or no glibc >= 2.35 here: llmforge runs as started")
    code = ("import os, sys\n"
            "print('start', os.getpid(), os.environ.get('LLMFORGE_MALLOC_TUNABLES'), os.environ.get('GLIBC_TUNABLES'), flush=True)\n"
            "from llmforge.cli import main\n"
            "if len(sys.argv) > 1:\n"
            "    raise SystemExit(main(['run', 'missing.yaml']))\n"  # in-process main(argv): no re-exec
            "sys.argv = ['llmforge', 'run', 'missing.yaml']\n"
            "from llmforge.runtime import host_malloc\n"
            "raise SystemExit(main())\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    starts = [line.split() for line in done.stdout.splitlines() if line.startswith("start")]
    assert done.returncode == 2, done.stderr[-2000:]  # the missing spec, named, after one re-exec
    assert len(starts) == 2 and starts[0][1] == starts[1][1], starts  # the same process
    assert starts[0][2:] == ["None", "None"] and starts[1][2:] == ["1", host_malloc.TUNABLES], starts
    once = subprocess.run([sys.executable, "-c", code, "argv"], capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert once.returncode == 2 and len([x for x in once.stdout.splitlines() if x.startswith("start")]) == 1, once.stdout
