"""docs/plugins.md runs: its Python blocks are one plugin, installed and tested as its author would.

The blocks go into a throwaway package, installed with `pip install --no-deps --target` into a
temporary folder and used from subprocesses with that folder on PYTHONPATH, so that its entry
point never leaks into other tests.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from llmforge import plugin
from llmforge.registry.components import EVALUATOR_NEEDS, RESERVED_METRIC_KEYS
from llmforge.registry.manager import AUTOLOAD_ENV

ROOT = Path(__file__).resolve().parents[3]
GUIDE = (ROOT / "docs" / "plugins.md").read_text()
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", flags=re.M | re.S)


def blocks() -> list[tuple[str, str | None, str]]:
    """(language, the file it is, its text) of every fenced block; the file from a `# file: PATH` first line."""
    out = []
    for lang, body in BLOCK.findall(GUIDE):
        first, _, rest = body.partition("\n")
        named = re.fullmatch(r"# file: (\S+)", first.strip())
        out.append((lang, named[1] if named else None, rest if named else body))
    return out


def test_every_python_block_is_a_file_of_the_example_plugin():
    python = [(path, text) for lang, path, text in blocks() if lang == "python"]
    assert len(python) >= 6 and all(path for path, _ in python), "every ```python block of docs/plugins.md starts with '# file: PATH'"
    files = {path for _, path, _ in blocks() if path}
    assert {"pyproject.toml", "src/llmforge_myplugin/__init__.py", "tests/test_myplugin.py"} <= files


def test_the_guide_names_the_whole_public_module_and_its_constants():
    for name in plugin.__all__:
        assert f"`{name}`" in GUIDE, f"docs/plugins.md does not document llmforge.plugin.{name}"
    reserved = re.search(r"These keys are reserved .*?:\n(.*?)\. A component", GUIDE, flags=re.S)[1]
    assert set(re.findall(r"`(\w+)`", reserved)) == RESERVED_METRIC_KEYS
    for need in EVALUATOR_NEEDS:
        assert f"`{need}`" in GUIDE
    assert "LLMFORGE_DISABLE_PLUGINS" in GUIDE and "LLMFORGE_API" in GUIDE and "Private in v1" in GUIDE


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """The guide's plugin written out and installed into a folder of its own; (its source, the env that sees it)."""
    tmp = tmp_path_factory.mktemp("docs-plugin")
    package = tmp / "llmforge-myplugin"
    for _, path, text in blocks():
        if path:
            (package / path).parent.mkdir(parents=True, exist_ok=True)
            (package / path).write_text(text)
    site = tmp / "site"
    # --no-build-isolation: setuptools is already here, and nothing may be fetched.
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--target", str(site), str(package)]
    done = subprocess.run(pip, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    env = {k: v for k, v in os.environ.items() if k != AUTOLOAD_ENV} | {"PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
    return package, env


@pytest.mark.slow
def test_the_guides_plugin_passes_its_own_tests(installed):
    package, env = installed
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"], cwd=package, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "5 passed" in proc.stdout, proc.stdout[-4000:] + proc.stderr[-2000:]


@pytest.mark.slow
def test_the_guides_plugin_is_listed_and_its_factories_import(installed):
    _, env = installed
    cli = [sys.executable, "-m", "llmforge.cli", "plugins"]
    listed = subprocess.run([*cli, "--json"], capture_output=True, text=True, env=env, timeout=120)
    assert listed.returncode == 0, listed.stderr
    mine = {(r["kind"], r["name"], r["description"]) for r in json.loads(listed.stdout) if r["provider"] == "llmforge-myplugin"}
    assert mine == {("optimizer", "signsgd", "signed SGD with momentum"),
                    ("evaluator", "next_token_accuracy", "exact next-token accuracy on the val split"),
                    ("callback", "stage_log", "one JSON line per finished stage")}
    checked = subprocess.run([*cli, "--check"], capture_output=True, text=True, env=env, timeout=300)
    assert checked.returncode == 0 and checked.stderr == "", checked.stderr
