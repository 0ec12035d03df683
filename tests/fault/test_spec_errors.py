"""Bad specs (promise 10): each is refused with exit 2, before any process group, leaving no file behind."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fault.harness import ROOT, SPEC, clean_env

pytestmark = pytest.mark.slow

# `llmforge run` in a fresh interpreter, reporting afterwards whether torch (hence any process group) was ever loaded.
PROBE = """
import json, os, sys
from llmforge.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as e:
    code = e.code
with open(os.environ["PROBE_OUT"], "w") as f:
    json.dump({"torch": "torch" in sys.modules, "code": code}, f)
sys.exit(code)
"""

FAKE_PLUGIN = """
from pydantic import BaseModel, ConfigDict, Field
from llmforge.registry import Component, hookimpl

class TurboOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field("turbo", description="The optimizer.")
    lr: float = Field(1e-3, description="Learning rate.")

@hookimpl
def register_optimizers():
    return [Component("turbo", TurboOptions, "{module}:build", "a fast optimizer")]
"""


def _fake_plugins(site: Path) -> None:
    """Two installed distributions, fake-a and fake-b, that both register an optimizer `turbo`."""
    for letter in "ab":
        module = f"fake_{letter}"
        (site / f"{module}.py").write_text(FAKE_PLUGIN.replace("{module}", module))
        info = site / f"fake_{letter}-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: fake-{letter}\nVersion: 1.0\n")
        (info / "entry_points.txt").write_text(f"[llmforge]\n{module} = {module}\n")


def _files(root: Path) -> set[Path]:
    return {p.relative_to(root) for p in root.rglob("*")}


CASES = {
    "unknown key": (SPEC.replace("  num_layers: 2\n", "  num_layers: 2\n  num_layer: 2\n"), [], ["num_layer", "spec.yaml:"]),
    "wrong type": (SPEC.replace("max_steps: 40", "max_steps: forty"), [], ["max_steps", "forty"]),
    "empty yaml": ("", [], ["spec.yaml"]),
    "override typo": (SPEC, ["stages.1.train.max_stpes=10"], ["max_stpes"]),
    "unknown plugin": (SPEC.replace("{name: adamw, lr: 1.0e-3}", "{name: adamww, lr: 1.0e-3}"), [], ["adamww", "did you mean 'adamw'"]),
    "duplicate plugin": (SPEC, [], ["turbo", "fake-a", "fake-b"]),
}


@pytest.mark.parametrize("case", CASES)
def test_a_bad_spec_exits_2_with_no_process_group_and_no_file(case, tmp_path):
    text, overrides, words = CASES[case]
    work = tmp_path / "work"
    work.mkdir()
    (work / "spec.yaml").write_text(text)
    env = clean_env() | {"PROBE_OUT": str(tmp_path / "probe.json"), "PYTHONPATH": str(ROOT)}
    if case == "duplicate plugin":
        site = tmp_path / "site"
        site.mkdir()
        _fake_plugins(site)
        env["PYTHONPATH"] += f":{site}"
    else:
        env["LLMFORGE_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    before = _files(work)
    # Two processes asked for: a missed error would relaunch under torchrun and start a process group.
    proc = subprocess.run([sys.executable, "-c", PROBE, "run", "spec.yaml", "--nproc-per-node", "2", *overrides],
                          cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    for word in words:
        assert word in proc.stderr, (word, proc.stderr)
    assert "Traceback" not in proc.stderr and proc.stderr.startswith("error:")
    assert json.loads((tmp_path / "probe.json").read_text()) == {"torch": False, "code": 2}
    assert _files(work) == before  # no run dir, no lock, no log
