"""The finetune stages' options: what `validate` refuses, and where it says the problem is."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from llmforge.registry.manager import reset_registry
from llmforge.spec.errors import SpecError
from llmforge.spec.validate import load_and_validate

TRAIN = {"micro_batch_size": 4, "global_batch_size": 8, "max_steps": 2}
TASKS = {"sources": {"add": {"name": "tasks", "tasks": ["add2"]}}}
PAIRS = {"sources": {"pairs": {"name": "tasks", "format": "preferences"}}}


def _spec(tmp_path: Path, stage: dict, **top) -> Path:
    spec = {"name": "ft", "tokenizer": {"name": "byte"},
            "model": {"name": "gpt", "num_layers": 2, "hidden_size": 32, "num_attention_heads": 2, "vocab_size": 320, "seq_length": 32},
            "stages": [{"name": "sft", "type": "sft", "data": TASKS, "train": TRAIN}, stage], **top}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _issues(path: Path) -> list:
    reset_registry()
    with pytest.raises(SpecError) as info:
        load_and_validate(str(path))
    return info.value.issues


STAGES = {
    "lora": {"data": TASKS, "lora": {"rank": 4, "target_modules": ["linear_qkv"]}},
    "prompt_tuning": {"data": TASKS, "max_seq_length": 16, "prompt_tuning": {"num_virtual_tokens": 4, "init": "random"}},
    "dpo": {"data": PAIRS, "beta": 0.2, "loss": "ipo"},
    "reward_model": {"data": PAIRS},
    "rl": {"data": TASKS, "rewards": [{"name": "exact_match"}], "group_size": 4},
}


@pytest.mark.parametrize("kind", STAGES)
def test_each_stage_validates(tmp_path, kind):
    reset_registry()
    spec, _ = load_and_validate(str(_spec(tmp_path, {"name": "ft2", "type": kind, "init_from": "sft", "train": TRAIN, **STAGES[kind]})))
    assert spec.stages[1].type == kind


@pytest.mark.parametrize("kind", STAGES)
def test_a_finetune_stage_needs_init_from(tmp_path, kind):
    issues = _issues(_spec(tmp_path, {"name": "ft2", "type": kind, "train": TRAIN, **STAGES[kind]}))
    # The key is missing, so the issue points at the stage itself (its line in the file).
    assert any(i.path[:2] == ("stages", 1) and f"stage type {kind!r} starts from a trained model" in i.message and i.location
               for i in issues), issues


@pytest.mark.parametrize("kind", STAGES)
def test_every_finetune_stage_takes_pipeline_and_sequence_parallelism(tmp_path, kind):
    stage = {"name": "ft2", "type": kind, "init_from": "sft", "train": TRAIN, **STAGES[kind]}
    for parallelism in ({"pipeline_model_parallel_size": 2, "nproc_per_node": 2},
                        {"tensor_model_parallel_size": 2, "sequence_parallel": True, "nproc_per_node": 2}):
        reset_registry()
        load_and_validate(str(_spec(tmp_path, stage, parallelism=parallelism)))  # raises SpecError on any issue


def test_rl_refuses_uneven_groups(tmp_path):
    stage = {"name": "ft2", "type": "rl", "init_from": "sft", "train": TRAIN, **STAGES["rl"]}
    stage["group_size"] = 3
    issues = _issues(_spec(tmp_path, stage))
    assert any(i.path == ("stages", 1, "train", "global_batch_size") and "groups of 3" in i.message for i in issues)


def test_lora_targets_and_unknown_keys_are_checked(tmp_path):
    stage = {"name": "ft2", "type": "lora", "init_from": "sft", "train": TRAIN, "data": TASKS, "lora": {"target_modules": ["linear_q"]}}
    assert any(i.path[:3] == ("stages", 1, "lora") for i in _issues(_spec(tmp_path, stage)))
    stage["lora"] = {"rank": 4, "alpah": 8}
    assert any("alpah" in str(i.path) or "alpah" in i.message for i in _issues(_spec(tmp_path, stage)))


@pytest.mark.parametrize("kind", ["sft", *STAGES])
def test_val_loss_without_a_val_split_is_refused(tmp_path, kind):
    stage = {"name": "ft2", "type": kind, "init_from": "sft", "train": TRAIN, **STAGES.get(kind, {"data": TASKS})}
    stage["data"] = {**stage["data"], "val_fraction": 0.0}
    issues = _issues(_spec(tmp_path, {**stage, "evaluators": [{"name": "exact_match", "tasks": {"tasks": ["add2"]}}, {"name": "val_loss"}]}))
    (issue,) = [i for i in issues if i.path == ("stages", 1, "data", "val_fraction")]
    assert "val_loss" in issue.message and "no val split" in issue.message and issue.location
    assert "raise data.val_fraction" in issue.hint
    reset_registry()
    load_and_validate(str(_spec(tmp_path, {**stage, "evaluators": []})))  # nothing reads the val split: fine
