"""Every spec in specs/ and examples/ validates against the code (as LitGPT checks its config hub)."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmforge.registry.manager import reset_registry
from llmforge.spec.errors import SpecError
from llmforge.spec.validate import load_and_validate

ROOT = Path(__file__).resolve().parents[2]
# examples/eval_tasks/ holds lm-evaluation-harness task YAMLs, not specs: the harness loads them in
# tests/unit/evaluation/test_harness.py.
SPECS = sorted([*ROOT.glob("specs/*.yaml"), *(p for p in ROOT.glob("examples/**/*.yaml") if "eval_tasks" not in p.parts)])

# Specs whose corpus is not in the repository: the 7B and Mixtral ones live on a cluster (Mixtral's
# tokenizer too), and shakespeare-char reads $TINYSHAKESPEARE. Their input files are checked where
# they exist; where they do not, everything else still is (`--skip-inputs`). Every other spec must
# find its inputs on any machine.
EXTERNAL_DATA = {"specs/7b-pretrain.yaml", "specs/shakespeare-char.yaml", "specs/mixtral-8x7b-pretrain.yaml",
                 "specs/llama3.1-8b-lora.yaml"}  # its import (checkpoint and tokenizer) and chats are on the training machine


def test_there_are_specs_to_check():
    shipped = {str(p.relative_to(ROOT)) for p in SPECS}
    assert {"specs/tiny.yaml", "specs/7b-pretrain.yaml"} <= shipped
    assert EXTERNAL_DATA <= shipped, "a spec named in EXTERNAL_DATA is gone; update the set"


@pytest.mark.parametrize("spec", SPECS, ids=lambda p: str(p.relative_to(ROOT)))
def test_shipped_spec_validates(spec, monkeypatch):
    monkeypatch.chdir(ROOT)  # relative data paths resolve against the working directory
    reset_registry()
    rel = str(spec.relative_to(ROOT))
    try:
        load_and_validate(rel)
    except SpecError as e:
        missing_inputs = all(i.message.startswith(("0 files match", "tokenizer file not found", "checkpoint not found"))
                             for i in e.issues)
        if not (rel in EXTERNAL_DATA and missing_inputs):
            raise
        load_and_validate(rel, check_inputs=False)


# specs/models/: the `model:` and `tokenizer:` sections of published models, meant for
# `extends:`, with each one's published parameter count.
PUBLISHED = {
    "llama3.1-8b": 8_030_261_248,
    "llama3.2-1b": 1_235_814_400,
    "mistral-7b-v0.3": 7_248_023_552,
    "qwen2.5-7b": 7_615_616_512,
    "qwen3-8b": 8_190_735_360,
    "mixtral-8x7b": 46_702_792_704,
    "qwen3-30b-a3b": 30_532_122_624,
    "qwen2-57b-a14b": 57_408_658_944,  # transformers' own count: tests/unit/interop/test_moe_families.py
}
# What one token passes through (top-k experts); a dense model's is all of it.
ACTIVE = {"mixtral-8x7b": 12_879_925_248, "qwen3-30b-a3b": 3_353_032_704, "qwen2-57b-a14b": 14_249_270_784}


def test_every_model_fragment_has_its_published_count():
    assert {p.stem for p in (ROOT / "specs" / "models").glob("*.yaml")} == set(PUBLISHED)


@pytest.mark.parametrize("model", PUBLISHED)
def test_model_fragment_composes_with_a_base_and_plans_to_its_published_count(model, tmp_path, capsys):
    import json

    import yaml

    from llmforge.cli import main

    reset_registry()
    fragment = ROOT / "specs" / "models" / f"{model}.yaml"
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"extends: [{ROOT / 'specs' / '7b-pretrain.yaml'}, {fragment}]\n")
    _, loaded = load_and_validate(str(spec), check_inputs=False)
    # The fragment decides the whole model and tokenizer: nothing of the base's Llama 2 or BPE is left.
    own = yaml.safe_load(fragment.read_text())
    assert loaded.data["model"] == own["model"]
    assert loaded.data["tokenizer"]["name"] == "pretrained" and set(loaded.data["tokenizer"]) == {"name", "path"}
    assert main(["plan", str(spec), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["params_total"] == PUBLISHED[model]
    assert plan["params_active"] == ACTIVE.get(model, PUBLISHED[model])


def test_mixtral_pretrain_fits_h100_with_experts_sharded(capsys):
    import json

    from llmforge.cli import main

    reset_registry()
    assert main(["plan", str(ROOT / "specs" / "mixtral-8x7b-pretrain.yaml"), "--gpu", "h100-80gb", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["fits"] and plan["layout"]["expert_model_parallel_size"] == 8 and plan["layout"]["world_size"] == 64
    assert (plan["params_total"], plan["params_active"]) == (PUBLISHED["mixtral-8x7b"], ACTIVE["mixtral-8x7b"])
    # Each rank holds 1 of each layer's 8 experts: far less than the model's 46.7 B over 4 stages.
    assert max(plan["params_per_rank"]) < 1.7e9
    # FLOPs per token come from the active parameters.
    assert plan["flops_per_token"] < 6.5 * plan["params_active"] + 6 * 32 * 4096 * 4096


def test_llama31_8b_lora_fits_one_h100_node_as_it_runs(capsys):
    """The LoRA stage is costed as it runs (plan/finetune.py): the frozen base's bf16 weights, gradients and optimizer
    state for the adapters only, 4096-token rows; costed as full training at the model's 8192 it would not fit."""
    import json

    from llmforge.cli import main
    from llmforge.plan.memory import Layout, memory_per_rank

    reset_registry()
    spec_path = ROOT / "specs" / "llama3.1-8b-lora.yaml"
    assert main(["plan", str(spec_path), "--gpu", "h100-80gb", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["fits"] and plan["layout"]["world_size"] == 8 and plan["params_total"] == PUBLISHED["llama3.1-8b"]
    (rank,) = plan["stages"][0]["memory_per_rank"]
    adapters = 32 * 16 * (4096 + 6144 + 4096 + 4096 + 4096 + 2 * 14336 + 14336 + 4096)  # r · (in + out) of qkv, proj, fc1, fc2
    assert rank["weights"] == 2 * (PUBLISHED["llama3.1-8b"] + adapters) and rank["gradients"] == 4 * adapters
    assert rank["frozen_models"] == rank["kv_cache"] == 0
    spec, _ = load_and_validate(str(spec_path), check_inputs=False)
    train = spec.stages[0].train
    (full,) = memory_per_rank(spec.model, Layout.from_spec(spec.parallelism, train), precision="bf16", optimizer=train.optimizer)
    assert full.total > 80 * 2**30 > plan["largest_memory"]["total"]
