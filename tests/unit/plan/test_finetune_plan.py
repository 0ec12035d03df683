"""`llmforge plan` on finetune stages: rows of the stage's own length (two per pair), and a fix that is
searched with the stage's own costing. The bytes themselves are checked against real runs in
test_reality_finetune.py."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from llmforge.cli import main
from llmforge.plan import finetune
from llmforge.plan.memory import Layout
from llmforge.registry.manager import reset_registry
from llmforge.spec.validate import load_and_validate

ROOT = Path(__file__).resolve().parents[3]
PAIRS = {"sources": {"pairs": {"name": "preferences", "paths": ["pairs.jsonl"]}}}


def _plan(tmp_path: Path, stage: dict, capsys, *overrides: str) -> tuple[dict, object]:
    reset_registry()
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"extends": str(ROOT / "specs" / "llama3.1-8b-lora.yaml"), "stages": [stage]}, sort_keys=False))
    (tmp_path / "pairs.jsonl").write_text("")
    assert main(["plan", str(spec), "--gpu", "h100-80gb", "--json", *overrides]) == 0
    plan = json.loads(capsys.readouterr().out)
    loaded, _ = load_and_validate(str(spec), list(overrides), check_inputs=False)
    return plan, loaded


def test_dpo_costs_two_rows_per_pair_and_its_reference(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    stage = {"name": "dpo", "type": "dpo", "init_from": "/nowhere/checkpoints/sft/step-9", "data": PAIRS, "max_seq_length": 2048,
             "train": {"precision": "bf16", "micro_batch_size": 1, "global_batch_size": 64, "max_steps": 100}}
    plan, spec = _plan(tmp_path, stage, capsys)
    (planned,) = plan["stages"]
    assert planned["tokens_per_step"] == 64 * 2 * 2048
    (rank,) = planned["memory_per_rank"]
    assert rank["frozen_models"] == rank["weights"] == 2 * plan["params_total"]
    assert rank["gradients"] == 4 * plan["params_total"]  # the policy trains whole
    # A whole 8B policy, its reference and AdamW do not fit on 8 H100s at DP 8; the fix is searched with the same costing.
    assert not plan["fits"]
    fix = planned["fix"]
    fixed_spec, _ = load_and_validate(str(tmp_path / "spec.yaml"), fix["overrides"], check_inputs=False)
    stage = fixed_spec.stages[0]
    layout = Layout.from_spec(fixed_spec.parallelism, stage.train)
    largest = max((finetune.rank_memory(spec.model, layout, s, stage=stage, precision="bf16", optimizer=stage.train.optimizer)
                   for s in range(layout.pipeline)), key=lambda r: r.total)
    assert largest.total == fix["largest_total"] <= fix["usable_bytes_per_rank"]
