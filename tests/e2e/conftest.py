"""End-to-end runs of real specs on CPU, shrunk by overrides so the suite stays fast."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# The tiny spec, shrunk: a few stdlib packages, a 2-layer hidden-64 model, 12 + 6 steps.
TINY_SMALL = [
    'data.sources.stdlib.paths=["${stdlib:}/json/*.py","${stdlib:}/email/*.py"]',
    "data.sources.stdlib.exclude=[]",
    "data.split.val_fraction=0.1",
    "tokenizer.vocab_size=512",
    "model.vocab_size=512",
    "model.num_layers=2",
    "model.hidden_size=64",
    "model.num_attention_heads=2",
    "model.ffn_hidden_size=176",
    "model.seq_length=64",
    "stages.1.train.micro_batch_size=4",
    "stages.1.train.global_batch_size=8",
    "stages.1.train.max_steps=12",
    "stages.1.train.lr_schedule.warmup_steps=2",
    "stages.1.train.eval_interval=6",
    "stages.1.train.eval_iters=2",
    "stages.1.train.precision=fp32",
    # The SFT stage, shrunk too: a few steps on the synthetic addition set.
    "stages.2.data.sources.addition.num_examples=200",
    "stages.2.train.micro_batch_size=4",
    "stages.2.train.global_batch_size=8",
    "stages.2.train.max_steps=6",
    "stages.2.train.eval_interval=6",
    "stages.2.train.precision=fp32",
    "stages.2.evaluators.1.tasks.num_examples=10",
    "checkpoint.interval=4",
    "logging.log_interval=1",
    "logging.sample_tokens=8",
]


def llmforge(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the CLI as a user would, in a fresh process."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env.pop("LLMFORGE_FAULT", None) if not (env and "LLMFORGE_FAULT" in env) else None
    return subprocess.run([sys.executable, "-m", "llmforge.cli", *args], cwd=ROOT, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


def rows(run_dir: Path, kind: str | None = None) -> list[dict]:
    out = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in out if kind is None or r["kind"] == kind]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """One uninterrupted run of the shrunk tiny spec, shared by the tests that read it."""
    run_dir = tmp_path_factory.mktemp("tiny") / "run"
    proc = llmforge("run", "specs/tiny.yaml", *TINY_SMALL, "--run-dir", str(run_dir))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run_dir
