"""The workflow users come for, on each family: import a published (Instruct-style) model, finetune it
with SFT, LoRA and DPO from a spec that `init_from`s the import and renders its chats with the
tokenizer's own template, at TP=1 and TP=2; loss falls; the merged and the `--peft` exports load in
transformers and peft and compute llmforge's logits (1e-4, fp32).

The four families are made and imported once; each layout is one launch (1 or 2 processes, both at
once) that runs all four families' specs through the CLI's own `run` and saves each stage's logits.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

from llmforge.interop.export import export_hf
from llmforge.interop.import_ import import_hf

from .families_tiny import FAMILIES, save_chat_family
from .tiny import random_ids

pytestmark = pytest.mark.slow
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
ATOL = 1e-4
WORKER = Path(__file__).with_name("finetune_worker.py")
IDS = random_ids(batch=2, seq=32, vocab=400, seed=4)
LAYOUTS = (1, 2)  # tensor_model_parallel_size
STAGES = ("sft", "lora", "dpo")
HF_CLASS = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
ANSWERS = ["Paris is the capital of France.", "About two million people live in Paris.", "You are welcome."]
CHATS = [{"messages": [{"role": "system", "content": "You are a terse assistant."},
                       {"role": "user", "content": f"What is the capital of France? ({n})"},
                       {"role": "assistant", "content": ANSWERS[n % 3]}]} for n in range(16)]
PAIRS = [{"prompt": f"How many people live there? ({n})", "chosen": "About two million people live in Paris.",
          "rejected": "Thanks! You are welcome."} for n in range(16)]


def train(lr: float) -> dict:
    return {"micro_batch_size": 4, "global_batch_size": 8, "max_steps": 6, "precision": "fp32",
            "optimizer": {"name": "adamw", "lr": lr}, "lr_schedule": {"name": "constant", "warmup_steps": 1}}


def finetune_spec(imported: Path, data: Path, tp: int) -> dict:
    """What a user writes after `llmforge import hf`: the import's model.yaml, and stages that start from its checkpoint."""
    chat = {"sources": {"chat": {"name": "instructions", "format": "messages", "paths": [str(data / "chat.jsonl")]}}, "val_fraction": 0}
    pairs = {"sources": {"pairs": {"name": "preferences", "paths": [str(data / "pairs.jsonl")]}}, "val_fraction": 0}
    common = {"chat_template": "tokenizer", "max_seq_length": 96, "evaluators": []}
    start = str(imported / "checkpoints" / "import" / "step-0")
    return {"extends": str(imported / "model.yaml"), "name": "finetune", "seed": 1,
            "parallelism": {"tensor_model_parallel_size": tp, "nproc_per_node": tp},
            "logging": {"log_interval": 1, "tensorboard": False},
            "stages": [{"name": "sft", "type": "sft", "init_from": start, "data": chat, **common, "train": train(3e-3)},
                       {"name": "lora", "type": "lora", "init_from": start, "data": chat, **common,
                        "lora": {"rank": 4, "alpha": 8.0}, "train": train(1e-2)},
                       {"name": "dpo", "type": "dpo", "init_from": "sft", "data": pairs, **common, "train": train(1e-3)}]}


def free_ports(count: int) -> list[int]:
    """Distinct free ports: every socket stays bound until all are chosen."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def launch(args: dict, ranks: int, port: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, str(WORKER), json.dumps(args)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             env={**os.environ, "RANK": str(rank), "WORLD_SIZE": str(ranks), "LOCAL_RANK": str(rank),
                                  "LOCAL_WORLD_SIZE": str(ranks), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                                  "OMP_NUM_THREADS": "1"})
            for rank in range(ranks)]


def finish(procs: list[subprocess.Popen]) -> None:
    """Wait for launched ranks (all launches at once); each must exit 0, else its output's tail is the failure."""
    try:
        outputs = [p.communicate(timeout=600)[0].decode(errors="replace") for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    # Every failed rank's tail: the rank that died first is often not rank 0 (a silent death of one
    # rank in the EP finetune fixture has been seen twice in full suites, rank 0 saying only "lost contact").
    failed = [f"rank {rank} exited {p.returncode}:\n{out[-4000:]}" for rank, (p, out) in enumerate(zip(procs, outputs, strict=True))
              if p.returncode != 0]
    assert not failed, "\n\n".join(failed)


@dataclass(frozen=True)
class Finetuned:
    root: Path

    def run_dir(self, family: str, tp: int) -> Path:
        return self.root / f"tp{tp}" / family

    def logits(self, family: str, tp: int, stage: str) -> torch.Tensor:
        return torch.load(self.root / f"tp{tp}" / f"{family}-{stage}.pt")

    def losses(self, family: str, tp: int, stage: str) -> list[float]:
        rows = [json.loads(line) for line in (self.run_dir(family, tp) / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in rows if r["kind"] == "train" and r["stage"] == stage]


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory) -> Finetuned:
    root = tmp_path_factory.mktemp("finetune")
    data = root / "data"
    data.mkdir()
    (data / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in CHATS))
    (data / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    for family in FAMILIES:
        import_hf(save_chat_family(family, root / "hf" / family), root / "imported" / family)
    procs = []
    for tp, port in zip(LAYOUTS, free_ports(len(LAYOUTS)), strict=True):
        (root / f"tp{tp}").mkdir()
        runs = {}
        for family in FAMILIES:
            spec = root / f"tp{tp}" / f"{family}.yaml"
            spec.write_text(yaml.safe_dump(finetune_spec(root / "imported" / family, data, tp), sort_keys=False))
            runs[family] = {"spec": str(spec), "run_dir": str(root / f"tp{tp}" / family), "stages": STAGES}
        procs += launch({"runs": runs, "ids": IDS.tolist(), "layout": [tp, 1], "out": str(root / f"tp{tp}")}, tp, port)
    finish(procs)
    return Finetuned(root)


@pytest.mark.parametrize("tp", LAYOUTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_sft_lora_and_dpo_from_the_import_lower_their_loss(finetuned, family, tp):
    for stage in STAGES:
        losses = finetuned.losses(family, tp, stage)
        print(f"{family} TP={tp} {stage}: loss {losses[0]:.4f} -> {losses[-1]:.4f}")
        assert len(losses) == 6 and losses[-1] < 0.8 * losses[0], (stage, losses)
    # DPO starts where the reference is the policy: -log sigmoid(0).
    assert finetuned.losses(family, tp, "dpo")[0] == pytest.approx(0.6931, abs=1e-3)
    log = (finetuned.run_dir(family, tp) / "run.log").read_text()
    assert "response tokens in [[ ]]" in log and "initialized from" in log


def _hf_logits(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(IDS).logits.float()


@pytest.mark.parametrize("tp", LAYOUTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_merged_and_peft_exports_compute_llmforge_logits(finetuned, tmp_path, family, tp):
    run_dir = finetuned.run_dir(family, tp)
    figures = {}
    for stage in ("sft", "lora"):
        export_hf(run_dir, tmp_path / stage, stage=stage, verify=False, log=lambda m: None)
        model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / stage, dtype=torch.float32)
        assert type(model).__name__ == HF_CLASS[family]  # the import's own class comes back
        figures[stage] = (_hf_logits(model) - finetuned.logits(family, tp, stage)).abs().max().item()
    export_hf(run_dir, tmp_path / "peft", stage="lora", peft=True, verify=False, log=lambda m: None)
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "peft" / "base", dtype=torch.float32)
    figures["lora --peft"] = (_hf_logits(peft.PeftModel.from_pretrained(base, tmp_path / "peft"))
                              - finetuned.logits(family, tp, "lora")).abs().max().item()
    print(f"{family} TP={tp} max |logit difference| vs llmforge: " + ", ".join(f"{k} {v:.1e}" for k, v in figures.items()))
    assert max(figures.values()) <= ATOL, figures
    # The LoRA stage changed the model: the adapters are not zero.
    assert (finetuned.logits(family, tp, "lora") - finetuned.logits(family, tp, "sft")).abs().max() > 0.01

