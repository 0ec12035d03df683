"""The planner's finetune rows against what llmforge really allocates on this CPU.

A worker (finetune_reality_worker.py) builds each stage's model as the stage does (LoRA adapters
or a soft prompt on a frozen model, or a frozen reference beside the policy), counts the bytes
autograd saves in one micro batch of the stage's rows, runs one real TrainStep and counts weight,
gradient and optimizer-state storage, and the KV cache an RL rollout's sampler allocates. The plan (`plan/finetune.py`) must match: state bytes and
the frozen models' weights exactly (up to the distributed optimizer's alignment padding),
activations within 15%, as for pretraining (test_reality.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from llmforge.plan.finetune import rank_memory
from llmforge.plan.memory import Layout
from llmforge.spec.validate import load_and_validate

from .test_reality import measure

WORKER = Path(__file__).with_name("finetune_reality_worker.py")
MODEL = {"name": "gpt", "num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "num_query_groups": 2, "ffn_hidden_size": 176,
         "vocab_size": 512, "seq_length": 128, "position_embedding_type": "rope", "normalization": "RMSNorm", "activation": "swiglu",
         "add_bias_linear": False}
CHAT = {"sources": {"chat": {"name": "instructions", "format": "messages", "paths": ["chat.jsonl"]}}}
PAIRS = {"sources": {"pairs": {"name": "preferences", "paths": ["pairs.jsonl"]}}}
INIT = "/nowhere/checkpoints/import/step-0"


def _train(precision: str, mbs: int = 2, gbs: int = 2) -> dict:
    return {"micro_batch_size": mbs, "global_batch_size": gbs, "max_steps": 1, "precision": precision,
            "optimizer": {"name": "adamw", "lr": 1e-3}}


STAGES = {
    "lora-bf16-dropout": {"type": "lora", "init_from": INIT, "data": CHAT, "max_seq_length": 64, "train": _train("bf16"),
                          "lora": {"rank": 4, "dropout": 0.1}},
    "lora-fp32-two-targets": {"type": "lora", "init_from": INIT, "data": CHAT, "max_seq_length": 96, "train": _train("fp32"),
                              "lora": {"rank": 8, "target_modules": ["linear_qkv", "linear_fc2"]}},
    "prompt-tuning-bf16": {"type": "prompt_tuning", "init_from": INIT, "data": CHAT, "max_seq_length": 56, "train": _train("bf16"),
                           "prompt_tuning": {"num_virtual_tokens": 8, "init": "random"}},
    "dpo-bf16": {"type": "dpo", "init_from": INIT, "data": PAIRS, "max_seq_length": 48, "train": _train("bf16")},
    "rl-fp32": {"type": "rl", "init_from": INIT, "data": {"sources": {"p": {"name": "instructions", "paths": ["p.jsonl"]}}},
                "max_seq_length": 40, "group_size": 2, "rewards": [{"name": "exact_match"}], "train": _train("fp32", 2, 4)},
    "rl-bf16-no-reference": {"type": "rl", "init_from": INIT, "data": {"sources": {"p": {"name": "instructions", "paths": ["p.jsonl"]}}},
                             "max_seq_length": 40, "group_size": 2, "kl_coef": 0.0, "rewards": [{"name": "exact_match"}],
                             "train": _train("bf16", 2, 8)},
}


def _case(tmp_path: Path, name: str, *overrides: str) -> dict:
    path = tmp_path / f"{name}.yaml"
    spec = {"name": name, "seed": 3, "tokenizer": {"name": "byte"}, "model": MODEL, "stages": [{"name": "ft", **STAGES[name]}]}
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return {"spec": str(path), "overrides": list(overrides)}


def check(case: dict, ranks: list[dict]) -> None:
    spec, _ = load_and_validate(case["spec"], case["overrides"], check_inputs=False)
    stage = spec.stages[0]
    layout = Layout.from_spec(spec.parallelism, stage.train)
    slack = 64 * 64 * 4 if spec.parallelism.use_distributed_optimizer else 0
    for got in ranks:
        want = rank_memory(spec.model, layout, got["pp_rank"], stage=stage, precision=stage.train.precision,
                           optimizer=stage.train.optimizer, device="cpu")
        where = f"{case} rank {got['rank']}"
        for key in ("weights", "gradients", "optimizer_states", "frozen_models", "kv_cache"):
            assert abs(got[key] - getattr(want, key)) <= slack, (where, key, got[key], getattr(want, key))
        plan_bytes = want.activations + want.logits
        assert plan_bytes == pytest.approx(got["saved_activations"], rel=0.15), (where, plan_bytes, got["saved_activations"])


@pytest.mark.slow
def test_finetune_stages_hold_what_the_plan_says(tmp_path):
    cases = [_case(tmp_path, name) for name in STAGES]
    results = measure(cases, 1, tmp_path, worker=WORKER)
    for case, ranks in zip(cases, results, strict=True):
        check(case, ranks)
    by_name = dict(zip(STAGES, results, strict=True))
    # What the plan's finetune rows are about: a frozen base has no gradients (full bf16 training's are twice the weights).
    lora = by_name["lora-bf16-dropout"][0]
    assert lora["gradients"] < 0.15 * lora["weights"] and by_name["dpo-bf16"][0]["frozen_models"] == by_name["dpo-bf16"][0]["weights"]
    assert by_name["rl-bf16-no-reference"][0]["kv_cache"] == by_name["rl-fp32"][0]["kv_cache"]  # twice the rows at half the bytes


@pytest.mark.slow
def test_lora_under_tensor_and_data_parallelism(tmp_path):
    two = "parallelism.nproc_per_node=2"
    cases = [_case(tmp_path, "lora-bf16-dropout", two, "parallelism.tensor_model_parallel_size=2"),
             _case(tmp_path, "lora-fp32-two-targets", two, "parallelism.use_distributed_optimizer=true", "stages.0.train.global_batch_size=4")]
    for case, ranks in zip(cases, measure(cases, 2, tmp_path, worker=WORKER), strict=True):
        check(case, ranks)
