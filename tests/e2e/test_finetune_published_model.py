"""docs/finetune-published-model.md runs as written: its commands, its spec and its Python, in order, in one
working directory, on a tiny random Llama 3.x model with Llama 3.1's chat template (made by transformers).
Only the stage's sizes are shrunk, by overrides appended to `llmforge run`.

import → validate → plan → run → generate → export (merged and --peft, each checked by transformers/peft
before it is published) → load in transformers and peft.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.unit.interop.families_tiny import save_chat_family

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "finetune-published-model.md"
MODEL_DIR = "~/models/Llama-3.2-1B-Instruct"
# A CPU-sized run of the doc's stage: short rows, small batches, a learning rate that shows in a few steps.
SHRINK = ["stages.0.max_seq_length=96", "stages.0.train.micro_batch_size=4", "stages.0.train.global_batch_size=8",
          "stages.0.train.optimizer.lr=1.0e-2", "logging.log_interval=1"]
ANSWERS = ["Paris.", "About two million people.", "You are welcome."]
CHATS = [{"messages": [{"role": "system", "content": "You are a terse assistant."},
                       {"role": "user", "content": f"What is the capital of France? ({n})"},
                       {"role": "assistant", "content": ANSWERS[n % 3]}]} for n in range(24)]


def doc_blocks() -> list[tuple[str, str]]:
    """(language, body) of every fenced block of the walkthrough, in order."""
    return re.findall(r"```(\w*)\n(.*?)```", DOC.read_text(), flags=re.S)


def steps(hf_dir: Path) -> list[tuple[str, object]]:
    """("file", (name, text)) for a block that starts with `# file: NAME`, ("command", argv) for each `$ ` line."""
    out: list[tuple[str, object]] = []
    for language, body in doc_blocks():
        first = body.splitlines()[0] if body.strip() else ""
        if language in ("yaml", "python") and first.startswith("# file: "):
            out.append(("file", (first.removeprefix("# file: ").strip(), body)))
        elif language == "console":
            for line in body.splitlines():
                if line.startswith("$ "):
                    argv = shlex.split(line[2:].replace(MODEL_DIR, str(hf_dir)))
                    head = [sys.executable, "-m", "llmforge.cli"] if argv[0] == "llmforge" else [sys.executable]
                    assert argv[0] in ("llmforge", "python"), line
                    out.append(("command", head + argv[1:] + (SHRINK if argv[1] == "run" else [])))
    return out


def test_the_walkthrough_runs_as_written(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    hf_dir = save_chat_family("llama", tmp_path / "models")
    work = tmp_path / "work"
    work.mkdir()
    (work / "chats.jsonl").write_text("".join(json.dumps(c) + "\n" for c in CHATS))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    outputs: dict[str, str] = {}
    for kind, what in steps(hf_dir):
        if kind == "file":
            name, text = what
            (work / name).write_text(text)
            continue
        proc = subprocess.run(what, cwd=work, env=env, capture_output=True, text=True, timeout=600)
        verb = what[3] if what[1] == "-m" else Path(what[1]).name
        outputs[verb] = outputs.get(verb, "") + proc.stdout + proc.stderr
        print(f"$ {' '.join(what[1:])}\n{proc.stdout}{proc.stderr}")
        assert proc.returncode == 0, f"{what}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert list(outputs) == ["import", "validate", "plan", "run", "generate", "export", "load.py"]
    assert "imported LlamaForCausalLM (family llama" in outputs["import"]
    assert "finetune.yaml: valid — llama-chat: lora (lora)" in outputs["validate"]
    assert "fits" in outputs["plan"]
    run_log = (work / "runs" / "llama-chat" / "run.log").read_text()
    assert "<|start_header_id|>assistant<|end_header_id|>\\n\\n[[Paris.<|eot_id|>]]" in run_log  # the template's turn trains
    losses = [json.loads(line)["loss"] for line in (work / "runs" / "llama-chat" / "metrics.jsonl").read_text().splitlines()
              if json.loads(line)["kind"] == "train"]
    assert losses[-1] < losses[0]
    # Both exports checked themselves against transformers (merged) and peft (adapters on the base).
    checks = re.findall(r"self-check \((.*?)\): max \|logit difference\| (\S+) .*?: passed", outputs["export"])
    assert [c[0] for c in checks] == ["transformers LlamaForCausalLM", "peft LoRA on transformers LlamaForCausalLM"], outputs["export"]
    # The merged export is the model as trained, its frozen base held in bf16; PEFT's base is the import's
    # own fp32 weights: they differ by the base's bf16 rounding alone (fp32 runs agree to 1e-4:
    # tests/unit/interop/test_finetune_families.py).
    difference = float(re.search(r"max \|logit difference\| (\S+)", outputs["load.py"]).group(1))
    assert 0 < difference < 0.1
    config = json.loads((work / "out" / "llama-chat-peft" / "adapter_config.json").read_text())
    assert config["r"] == 16 and config["lora_alpha"] == 32
