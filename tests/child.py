"""Run a test module as its own child process (a fresh interpreter for megatron's global state) and read its facts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS")


def worker_facts(script: str, out: Path, *args: str, timeout: float = 600) -> dict:
    """`python script --out OUT *args` in a clean environment; the JSON it wrote to OUT."""
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS}
    env.update(PYTHONWARNINGS="ignore", PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, script, "--out", str(out), *args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-5000:]
    return json.loads(Path(out).read_text())
