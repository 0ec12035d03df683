"""What users come for, on the MoE families: import an Instruct-style Mixtral, Qwen3-MoE or Qwen2-MoE,
finetune it with SFT and LoRA from a spec that `init_from`s the import and renders its chats with
the tokenizer's own template, with the experts split over two ranks (EP=2); loss falls; the merged
exports load in transformers as the import's own class and compute llmforge's logits (1e-4, fp32).

LoRA adapts the attention linears and every routed expert's and the shared expert's linear_fc1 /
linear_fc2 (the `lora` stage, default targets); the `lora_attention` stage adapts only linear_qkv
and linear_proj, which `export hf --peft` writes for PEFT (PEFT cannot adapt transformers 5's fused
experts, so `--peft` refuses adapters on them, naming the targets).

The three families are made and imported once; one 2-process launch runs all three specs through
the CLI's own `run` (finetune_worker.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

from llmforge.cli import main
from llmforge.interop.export import export_hf
from llmforge.interop.import_ import import_hf

from .moe_tiny import FAMILIES, SPECS, save_chat_moe_family
from .test_finetune_families import CHATS, finish, free_ports, launch
from .tiny import random_ids

pytestmark = pytest.mark.slow
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
ATOL = 1e-4
IDS = random_ids(batch=2, seq=32, vocab=400, seed=4)
STAGES = ("sft", "lora", "lora_attention")
EP = ["parallelism.expert_model_parallel_size=2"]


def train(lr: float) -> dict:
    return {"micro_batch_size": 4, "global_batch_size": 8, "max_steps": 6, "precision": "fp32",
            "optimizer": {"name": "adamw", "lr": lr}, "lr_schedule": {"name": "constant", "warmup_steps": 1}}


def finetune_spec(imported: Path, data: Path) -> dict:
    chat = {"sources": {"chat": {"name": "instructions", "format": "messages", "paths": [str(data / "chat.jsonl")]}}, "val_fraction": 0}
    common = {"init_from": str(imported / "checkpoints" / "import" / "step-0"), "data": chat, "chat_template": "tokenizer",
              "max_seq_length": 96, "evaluators": []}
    return {"extends": str(imported / "model.yaml"), "name": "finetune", "seed": 1,
            "parallelism": {"expert_model_parallel_size": 2, "nproc_per_node": 2},
            "logging": {"log_interval": 1, "tensorboard": False},
            "stages": [{"name": "sft", "type": "sft", **common, "train": train(3e-3)},
                       {"name": "lora", "type": "lora", **common, "lora": {"rank": 4, "alpha": 8.0}, "train": train(1e-2)},
                       {"name": "lora_attention", "type": "lora", **common, "train": train(3e-2),
                        "lora": {"rank": 4, "alpha": 8.0, "target_modules": ["linear_qkv", "linear_proj"]}}]}


@dataclass(frozen=True)
class Finetuned:
    root: Path

    def run_dir(self, family: str) -> Path:
        return self.root / "runs" / family

    def logits(self, family: str, stage: str) -> torch.Tensor:
        return torch.load(self.root / f"{family}-{stage}.pt")

    def losses(self, family: str, stage: str) -> list[float]:
        rows = [json.loads(line) for line in (self.run_dir(family) / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in rows if r["kind"] == "train" and r["stage"] == stage]


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory) -> Finetuned:
    root = tmp_path_factory.mktemp("moe-finetune")
    data = root / "data"
    data.mkdir()
    (data / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in CHATS))
    runs = {}
    for family in FAMILIES:
        import_hf(save_chat_moe_family(family, root / "hf" / family), root / "imported" / family)
        spec = root / f"{family}.yaml"
        spec.write_text(yaml.safe_dump(finetune_spec(root / "imported" / family, data), sort_keys=False))
        runs[family] = {"spec": str(spec), "run_dir": str(root / "runs" / family), "stages": STAGES}
    procs = launch({"runs": runs, "ids": IDS.tolist(), "overrides": EP, "out": str(root)}, 2, free_ports(1)[0])
    finish(procs)
    return Finetuned(root)


@pytest.mark.parametrize("family", FAMILIES)
def test_sft_and_lora_from_the_import_lower_their_loss(finetuned, family):
    for stage in STAGES:
        losses = finetuned.losses(family, stage)
        print(f"{family} EP=2 {stage}: loss {losses[0]:.4f} -> {losses[-1]:.4f}")
        assert len(losses) == 6 and losses[-1] < 0.8 * losses[0], (stage, losses)
    log = (finetuned.run_dir(family) / "run.log").read_text()
    assert "response tokens in [[ ]]" in log
    # The attention, this rank's routed experts (2 of 4 at EP=2) and the shared expert of each layer got adapters.
    experts = 2 * 2 * 2  # layers × local experts × (fc1, fc2)
    adapters = 2 * 2 + experts + (2 * 2 if family == "qwen2_moe" else 0)
    assert f"[lora] {adapters} LoRA adapters" in log, log


def _hf_logits(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(IDS).logits.float()


@pytest.mark.parametrize("family", FAMILIES)
def test_merged_exports_compute_llmforge_logits(finetuned, tmp_path, family):
    figures = {}
    for stage in STAGES:
        done = export_hf(finetuned.run_dir(family), tmp_path / stage, stage=stage, log=lambda m: None)
        assert done["check"]["passed"], done["check"]
        model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / stage, dtype=torch.float32)
        assert type(model).__name__ == SPECS[family][3]  # the import's own class comes back
        figures[stage] = (_hf_logits(model) - finetuned.logits(family, stage)).abs().max().item()
    print(f"{family} EP=2 max |logit difference| vs llmforge: " + ", ".join(f"{k} {v:.1e}" for k, v in figures.items()))
    assert max(figures.values()) <= ATOL, figures
    # The adapters on the experts changed the model beyond what the attention's alone did.
    assert (finetuned.logits(family, "lora") - finetuned.logits(family, "lora_attention")).abs().max() > 0.01


def test_peft_export_of_attention_adapters_and_refusal_on_experts(finetuned, tmp_path, capsys):
    run = finetuned.run_dir("qwen2_moe")
    export_hf(run, tmp_path / "peft", stage="lora_attention", peft=True, log=lambda m: None)
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "peft" / "base", dtype=torch.float32)
    theirs = _hf_logits(peft.PeftModel.from_pretrained(base, tmp_path / "peft"))
    assert (theirs - finetuned.logits("qwen2_moe", "lora_attention")).abs().max() <= ATOL
    assert main(["export", "hf", str(run), str(tmp_path / "refused"), "--stage", "lora", "--peft"]) == 2
    err = capsys.readouterr().err
    assert "--peft cannot write adapters on the experts' linear_fc1 and linear_fc2 (lora.target_modules)" in err, err
    assert not (tmp_path / "refused").exists()
