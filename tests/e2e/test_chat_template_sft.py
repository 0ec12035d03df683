"""`chat_template: tokenizer` end to end: an SFT stage on multi-turn chats with Qwen3's template logs its
masked examples before training, trains, and `generate --template tokenizer` on its checkpoint encodes
prompts exactly as transformers' `apply_chat_template(..., add_generation_prompt=True)`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.e2e.conftest import llmforge
from tests.unit.data.chat_fixtures import tokenizer_folder

pytestmark = pytest.mark.slow

CHATS = [[{"role": "system", "content": "You are a terse assistant."},
          {"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris."},
          {"role": "user", "content": "How many people live there?"}, {"role": "assistant", "content": f"About {n} million."}]
         for n in range(2, 10)]


def test_sft_with_the_tokenizer_template_logs_masked_examples_trains_and_generates(tmp_path):
    transformers = pytest.importorskip("transformers")
    folder = tokenizer_folder(tmp_path, "qwen3")
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps({"messages": chat}) + "\n" for chat in CHATS))
    spec = {"name": "chat", "seed": 1, "tokenizer": {"name": "pretrained", "path": str(folder)},
            "data": {"sources": {"text": {"name": "tasks", "tasks": ["add2"], "num_examples": 2000, "seed": 1, "format": "text"}},
                     "split": {"val_fraction": 0.2}},
            "model": {"name": "gpt", "num_layers": 2, "hidden_size": 32, "num_attention_heads": 2, "ffn_hidden_size": 64,
                      "vocab_size": 512, "seq_length": 128},
            "logging": {"log_interval": 1, "tensorboard": False},
            "stages": [{"name": "prepare", "type": "prepare"},
                       {"name": "sft", "type": "sft", "chat_template": "tokenizer", "data": {"sources": {"chat": {
                           "name": "instructions", "format": "messages", "paths": [str(tmp_path / "chat.jsonl")]}}, "val_fraction": 0},
                        "evaluators": [], "train": {"micro_batch_size": 2, "global_batch_size": 4, "max_steps": 2,
                                                    "optimizer": {"name": "adamw", "lr": 1.0e-3}}}]}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    run_dir = tmp_path / "run"
    proc = llmforge("run", str(tmp_path / "spec.yaml"), "--run-dir", str(run_dir))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = (run_dir / "run.log").read_text()
    # Both answers train with their <|im_end|>; the last one's empty think block and every header do not.
    assert ("<|im_start|>assistant\\n[[Paris.<|im_end|>]]\\n<|im_start|>user\\nHow many people live there?<|im_end|>\\n"
            "<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n[[About") in log, log[-3000:]

    from llmforge.interop.generate import TextGenerator

    generator = TextGenerator(run_dir, template="tokenizer", load=False)
    want = transformers.AutoTokenizer.from_pretrained(str(folder)).apply_chat_template(
        [{"role": "user", "content": "Where is Paris?"}], add_generation_prompt=True, tokenize=True)["input_ids"]
    assert generator.prompt_ids("Where is Paris?") == want
    assert TextGenerator(run_dir, load=False).prompt_ids("Where is Paris?") == want  # --template auto: the stage's template
    proc = llmforge("generate", str(run_dir), "--template", "tokenizer", "--prompt", "Where is Paris?", "--max-new-tokens", "4",
                    "--temperature", "0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert Path(run_dir / "tokenizer" / "chat_template.jinja").is_file()  # the template travels with the run's tokenizer
