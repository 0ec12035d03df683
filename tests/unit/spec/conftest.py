"""Fixtures for spec tests: small spec files on disk and the CLI run in-process."""

from __future__ import annotations

import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from llmforge.cli import main
from llmforge.registry.manager import AUTOLOAD_ENV, reset_registry

# A valid spec with every section the checks look at; small and with no input files (its text source is generated).
BASE_SPEC = """\
name: t
tokenizer: {name: byte}
model:
  name: gpt
  num_layers: 4
  hidden_size: 64
  num_attention_heads: 4
  vocab_size: 512
  seq_length: 32
parallelism:
  tensor_model_parallel_size: 1
data: {sources: {add: {name: tasks, format: text}}}
stages:
  - name: prepare
    type: prepare
  - name: pretrain
    type: pretrain
    train:
      micro_batch_size: 2
      global_batch_size: 4
      max_steps: 10
      optimizer: {name: adamw, lr: 1.0e-3}
"""


@pytest.fixture(autouse=True)
def builtin_registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Built-ins only, rebuilt per test: installed plugins must not change what these tests see."""
    monkeypatch.setenv(AUTOLOAD_ENV, "1")
    reset_registry()
    yield
    reset_registry()


@pytest.fixture
def write_spec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., Path]:
    """Write a spec under tmp_path and work there, so locations read `spec.yaml:LINE:COL`."""
    monkeypatch.chdir(tmp_path)

    def write(text: str = BASE_SPEC, name: str = "spec.yaml") -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
        return path

    return write


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., tuple[int, str, str]]:
    """Run `llmforge ARGS` in-process; returns (exit code, stdout, stderr)."""

    def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:  # argparse errors
            code = e.code if isinstance(e.code, int) else 2
        out, err = capsys.readouterr()
        return code, out, err

    return run
