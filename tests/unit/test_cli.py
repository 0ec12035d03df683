"""The `llmforge` command line: exit codes, output shapes, and never a traceback for bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llmforge import __version__
from llmforge.cli import main
from llmforge.registry.manager import AUTOLOAD_ENV, reset_registry

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def builtins_only(monkeypatch):
    monkeypatch.setenv(AUTOLOAD_ENV, "1")
    reset_registry()
    yield
    reset_registry()


def run(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_version(capsys):
    assert run(capsys, "--version")[:2] == (0, f"llmforge {__version__}\n")


@pytest.mark.slow
def test_the_shipped_7b_spec_validates_in_a_real_process():
    proc = subprocess.run([sys.executable, "-m", "llmforge", "validate", "specs/7b-pretrain.yaml", "--skip-inputs"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "specs/7b-pretrain.yaml: valid — llama2-7b: prepare (prepare), pretrain (pretrain), sft (sft)\n"


@pytest.mark.slow
def test_a_broken_spec_exits_2_in_a_real_process(tmp_path):
    spec = tmp_path / "bad.yaml"
    spec.write_text((ROOT / "specs" / "tiny.yaml").read_text().replace("num_attention_heads: 4", "num_attention_heads: four"))
    proc = subprocess.run([sys.executable, "-m", "llmforge", "validate", str(spec)], capture_output=True, text=True, timeout=60,
                          env={**os.environ, AUTOLOAD_ENV: "1"})
    assert proc.returncode == 2 and proc.stdout == ""
    assert "model.num_attention_heads: Input should be a valid integer" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["validate", "no/such/spec.yaml"], "spec file not found: no/such/spec.yaml"),
        (["validate", "."], "cannot read"),
        (["validate", "specs/tiny.yaml", "model.num_layers"], "is not KEY=VALUE"),
        (["validate"], "the following arguments are required: spec"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_bad_input_exits_2_with_a_message(capsys, monkeypatch, args, words):
    monkeypatch.chdir(ROOT)
    code, out, err = run(capsys, *args)
    assert code == 2 and words in err and "Traceback" not in err


def test_schema_prints_the_json_schema(capsys):
    code, out, _ = run(capsys, "schema")
    schema = json.loads(out)
    assert code == 0 and schema["title"] == "llmforge spec"
    assert set(schema["required"]) == {"name", "tokenizer", "model", "stages"}
    assert out == (ROOT / "docs" / "spec.schema.json").read_text()


def test_schema_markdown_and_output_file(capsys, tmp_path):
    code, markdown, _ = run(capsys, "schema", "--markdown")
    assert code == 0 and markdown.startswith("# Spec reference\n")
    target = tmp_path / "out" / "reference.md"
    assert run(capsys, "schema", "--markdown", "--output", target) == (0, "", "")
    assert target.read_text() == markdown
    assert [p.name for p in target.parent.iterdir()] == ["reference.md"]  # no temporary file left behind
