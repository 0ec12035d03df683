"""Shared fixtures. Tests run on CPU; multi-process tests use gloo on loopback."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

# Several test processes share 2 cores; one thread each avoids oversubscription.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# `llmforge run` picks two CPU processes for small pretraining specs (runtime.cpu_layout); the
# suite's runs keep the layouts their specs say, and tests of that choice turn it back on.
os.environ.setdefault("LLMFORGE_AUTO_LAYOUT", "0")
# The runs' cache of this CPU's measured matmul peak (runtime.device): one for the session, not the user's.
if "LLMFORGE_CACHE_DIR" not in os.environ:
    os.environ["LLMFORGE_CACHE_DIR"] = tempfile.mkdtemp(prefix="llmforge-test-cache-")
    atexit.register(shutil.rmtree, os.environ["LLMFORGE_CACHE_DIR"], ignore_errors=True)


@pytest.fixture
def root() -> Path:
    return ROOT


@pytest.fixture
def tinyshakespeare() -> Path:
    path = Path(os.environ.get("TINYSHAKESPEARE", SHARED_DATA / "tinyshakespeare.txt"))
    if not path.exists():
        pytest.skip(f"tinyshakespeare corpus not found at {path} (set TINYSHAKESPEARE to run this test)")
    return path
