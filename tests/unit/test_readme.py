"""The README's Quick start and .ci/run: two complete commands, and CI runs the second verbatim."""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
CI = ROOT / ".ci" / "run"


def section(title: str) -> str:
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", README, flags=re.M | re.S)
    assert m, f"README has no '## {title}' section"
    return m[1]


def quick_start() -> list[str]:
    blocks = re.findall(r"^```(\w*)\n(.*?)^```", section("Quick start"), flags=re.M | re.S)
    assert len(blocks) == 2, "Quick start must have exactly two fenced commands"
    assert all(lang in ("shell", "sh", "bash", "console") for lang, _ in blocks)
    commands = [body.strip() for _, body in blocks]
    assert all("\n" not in c for c in commands), "each Quick start command is one line"
    return commands


def test_both_commands_start_from_nothing():
    for command in quick_start():
        # A fresh machine: its own venv, and the CPU torch before llmforge (which needs it).
        assert command.startswith("python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && pip install -e ")


def test_the_first_command_installs_and_runs_the_default_spec():
    first, _ = quick_start()
    assert first.endswith(("llmforge validate specs/tiny.yaml && llmforge plugins", "llmforge run specs/tiny.yaml"))
    assert (ROOT / "specs" / "tiny.yaml").exists()


def test_the_second_command_installs_dev_extras_and_the_plugin_and_runs_pytest():
    _, second = quick_start()
    assert 'pip install -e ".[dev]" -e plugins/llmforge-lion' in second and second.endswith("&& pytest -q")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert {"pytest", "hypothesis"} <= {re.split(r"[<>=\[ ]", d)[0] for d in extras["dev"]}
    assert "gpu" in extras
    assert (ROOT / "plugins" / "llmforge-lion" / "pyproject.toml").exists()


def test_ci_runs_the_readme_test_command_verbatim():
    _, second = quick_start()
    script = CI.read_text()
    assert script.startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in script
    assert os.access(CI, os.X_OK)
    commands = [line for line in script.splitlines() if line and not line.startswith("#") and line != "set -euo pipefail"]
    assert commands[-1] == second


def test_the_readme_documents_gpu_install_and_the_editor_schema_line():
    gpu = section("GPU installation")
    assert "download.pytorch.org/whl/cu" in gpu and 'pip install -e ".[gpu]"' in gpu and "torchrun" in gpu
    assert "# yaml-language-server: $schema=../docs/spec.schema.json" in README
