"""`validate`, `plan`, `schema` and `plugins` never import torch or megatron (they must answer in well under a second).

Each case profiles a fresh `python -X importtime` process, hence `slow`.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "megatron", "transformer_engine", "transformers")

COMMANDS = {
    "validate": ["validate", "specs/7b-pretrain.yaml", "--skip-inputs"],
    "plan": ["plan", "specs/7b-pretrain.yaml"],
    "schema": ["schema"],
    "plugins": ["plugins"],
}


def imported_modules(args: list[str]) -> list[str]:
    # Entry-point plugins stay on: an installed plugin must not pull torch in either.
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "llmforge", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [m[1] for m in re.finditer(r"^import time:\s+\d+ \|\s+\d+ \|\s*(\S+)$", proc.stderr, flags=re.M)]


@pytest.mark.slow
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_light_commands_do_not_import_torch_or_megatron(command):
    modules = imported_modules(COMMANDS[command])
    assert "llmforge.cli" in modules  # the profile really covers the command
    heavy = sorted({m for m in modules if m.split(".")[0] in HEAVY})
    assert not heavy, f"`llmforge {command}` imports {heavy}; import them inside the function that needs them"
