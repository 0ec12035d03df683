"""The finetune stages end to end through `llmforge run`: what each writes, and bitwise resume.

One spec runs every stage type on a toy model (byte tokenizer, synthetic tasks, a few steps
each). A second run of it is killed twice (inside the LoRA stage, then inside the RL stage)
and resumed each time; its metrics must equal the uninterrupted run's, float for float.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.e2e.conftest import llmforge, rows

pytestmark = pytest.mark.slow

TRAIN = {"micro_batch_size": 8, "global_batch_size": 16, "max_steps": 4, "optimizer": {"name": "adamw", "lr": 1.0e-3},
         "lr_schedule": {"name": "constant", "warmup_steps": 1}, "eval_iters": 1}
ADD = {"sources": {"add": {"name": "tasks", "tasks": ["add2"], "num_examples": 200, "seed": 1}}}
PAIRS = {"sources": {"pairs": {"name": "tasks", "tasks": ["add2"], "num_examples": 200, "seed": 1, "format": "preferences"}}}
HELD_OUT = {"tasks": ["add2"], "num_examples": 8, "seed": 99}
SPEC = {
    "name": "finetune-e2e",
    "seed": 5,
    "tokenizer": {"name": "byte"},
    "data": {"sources": {"text": {"name": "tasks", "tasks": ["add2"], "num_examples": 400, "seed": 3, "format": "text"}},
             "split": {"val_fraction": 0.1}},
    "model": {"name": "gpt", "num_layers": 2, "hidden_size": 32, "num_attention_heads": 2, "ffn_hidden_size": 64, "vocab_size": 320,
              "seq_length": 32, "position_embedding_type": "rope", "normalization": "RMSNorm", "activation": "swiglu",
              "add_bias_linear": False},
    "logging": {"log_interval": 1, "tensorboard": False},
    "checkpoint": {"interval": 3, "keep_last": 2},
    "stages": [
        {"name": "prepare", "type": "prepare"},
        {"name": "pretrain", "type": "pretrain", "train": {**TRAIN, "micro_batch_size": 4, "global_batch_size": 8}},
        {"name": "sft", "type": "sft", "init_from": "pretrain", "data": ADD, "max_seq_length": 16, "train": TRAIN},
        {"name": "lora", "type": "lora", "init_from": "sft", "data": ADD, "max_seq_length": 16, "lora": {"rank": 4}, "train": TRAIN,
         "evaluators": [{"name": "val_loss"}, {"name": "exact_match", "tasks": HELD_OUT, "max_new_tokens": 4}]},
        {"name": "after_lora", "type": "sft", "init_from": "lora", "data": ADD, "max_seq_length": 16, "train": {**TRAIN, "max_steps": 1}},
        {"name": "prompt", "type": "prompt_tuning", "init_from": "sft", "data": ADD, "max_seq_length": 16,
         "prompt_tuning": {"num_virtual_tokens": 4}, "train": TRAIN,
         "evaluators": [{"name": "val_loss"}, {"name": "exact_match", "tasks": HELD_OUT, "max_new_tokens": 4}]},
        {"name": "dpo", "type": "dpo", "init_from": "sft", "data": PAIRS, "max_seq_length": 16, "train": TRAIN,
         "evaluators": [{"name": "val_loss"}, {"name": "preference", "tasks": HELD_OUT}]},
        {"name": "rm", "type": "reward_model", "init_from": "sft", "data": PAIRS, "max_seq_length": 16, "train": TRAIN,
         "evaluators": [{"name": "val_loss"}, {"name": "pairwise_accuracy", "tasks": HELD_OUT}]},
        {"name": "rl", "type": "rl", "init_from": "sft", "data": ADD, "max_seq_length": 16, "max_new_tokens": 4, "group_size": 4,
         "updates_per_rollout": 2, "rewards": [{"name": "exact_match"}, {"name": "reward_model", "stage": "rm", "weight": 0.5}],
         "train": TRAIN, "evaluators": [{"name": "mean_reward", "tasks": HELD_OUT, "max_new_tokens": 4}]},
    ],
}
# Train steps before the kills, counted per process: pretrain 4, sft 4, lora's 4th step is the
# 12th; after resuming from lora's step-3 checkpoint: lora 1 + after_lora 1 + prompt 4 + dpo 4
# + rm 4, so rl's 4th step is the 18th.
KILL_IN_LORA, KILL_IN_RL = "train_step@12", "train_step@18"
TIMING = ("tokens_per_s", "mfu", "memory_mb")


def _comparable(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows(run_dir)]


@pytest.fixture(scope="module")
def spec_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("finetune") / "finetune.yaml"
    path.write_text(yaml.safe_dump(SPEC, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def finetune_run(spec_path) -> Path:
    run_dir = spec_path.parent / "run"
    proc = llmforge("run", str(spec_path), "--run-dir", str(run_dir))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run_dir


def test_each_stage_evaluates_its_starting_checkpoint_then_trains(finetune_run):
    evals = [r for r in rows(finetune_run, "eval")]
    for stage, metric in [("lora", "exact_match"), ("prompt", "exact_match"), ("dpo", "pref_win_rate"), ("rm", "rm_accuracy"),
                          ("rl", "mean_reward")]:
        steps = [r["step"] for r in evals if r["stage"] == stage]
        assert steps == [0, 4], (stage, steps)
        assert all(metric in r for r in evals if r["stage"] == stage)
    dpo_start = next(r for r in evals if r["stage"] == "dpo" and r["step"] == 0)
    # Policy and reference are the same model at step 0.
    assert dpo_start["dpo_reward_margin"] == 0.0 and dpo_start["pref_margin"] == dpo_start["ref_pref_margin"]
    assert dpo_start["val_loss"] == pytest.approx(0.6931, abs=1e-4)  # log 2
    rollouts = rows(finetune_run, "rollout")
    assert [r["step"] for r in rollouts] == [1, 2, 3, 4]
    assert {"reward_mean", "reward/exact_match", "reward/reward_model", "uniform_groups"} <= set(rollouts[0])


def test_each_stage_mfu_divides_by_the_flops_its_plan_counts(finetune_run, spec_path, capsys):
    """A frozen base computes no weight gradients and DPO runs its reference's forward too: each
    stage's mfu over tokens_per_s is `llmforge plan`'s FLOPs per token for that stage over one peak."""
    from llmforge.cli import main

    assert main(["plan", str(spec_path), "--gpu", "cpu", "--json"]) == 0
    plan = {stage["name"]: stage for stage in json.loads(capsys.readouterr().out)["stages"]}
    train = rows(finetune_run, "train")
    pretrain = next(r for r in train if r["stage"] == "pretrain")
    peak = pretrain["tokens_per_s"] * plan["pretrain"]["flops_per_token"] / pretrain["mfu"]
    for stage in ("pretrain", "sft", "lora", "prompt", "dpo", "rm", "rl"):
        for row in (r for r in train if r["stage"] == stage):
            assert row["mfu"] == pytest.approx(row["tokens_per_s"] * plan[stage]["flops_per_token"] / peak, rel=1e-9), (stage, row)
    assert plan["lora"]["flops_per_token"] < plan["sft"]["flops_per_token"] < plan["dpo"]["flops_per_token"]


def test_frozen_base_stages_save_what_they_train(finetune_run):
    ckpt = finetune_run / "checkpoints"
    # LoRA: adapters alone (plus how to rebuild the model), and the merged model at the end.
    assert sorted(p.name for p in (ckpt / "lora/step-3").iterdir() if p.is_dir()) == ["adapters", "rng"]
    assert (ckpt / "lora/step-4/model").is_dir() and (ckpt / "lora/step-4/adapters").is_dir()
    meta = json.loads((ckpt / "lora/step-3/lora.json").read_text())
    assert meta["base"] == "checkpoints/sft/step-4" and meta["rank"] == 4

    def size(path: Path) -> int:
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())

    assert size(ckpt / "lora/step-3") < size(ckpt / "sft/step-4") / 2
    assert sorted(p.name for p in (ckpt / "prompt/step-4").iterdir() if p.is_dir()) == ["prompt", "rng"]
    assert json.loads((ckpt / "prompt/step-4/prompt.json").read_text())["num_virtual_tokens"] == 4
    # A later stage starts from the LoRA stage's merged model.
    assert "initialized from" in (finetune_run / "run.log").read_text().split("[after_lora] sft stage started")[1]


def test_generate_and_export_take_finetune_checkpoints(finetune_run, tmp_path):
    for source in ("checkpoints/lora/step-3", "checkpoints/lora/step-4", "checkpoints/prompt/step-4", "checkpoints/rl/step-4"):
        proc = llmforge("generate", str(finetune_run / source), "--prompt", "12+30=", "--temperature", "0", "--max-new-tokens", "4")
        assert proc.returncode == 0, (source, proc.stderr[-2000:])
    interactive = subprocess.run([sys.executable, "-m", "llmforge.cli", "generate", str(finetune_run), "--stage", "sft", "--interactive",
                                  "--top-k", "5", "--top-p", "0.9", "--max-new-tokens", "4"], input="1+1=\n2+2=\n\n", capture_output=True,
                                 text=True, timeout=300, env={k: v for k, v in os.environ.items() if k != "LLMFORGE_FAULT"})
    assert interactive.returncode == 0 and len(interactive.stdout.splitlines()) == 2
    exported = llmforge("export", "hf", str(finetune_run / "checkpoints/lora/step-3"), str(tmp_path / "hf"))
    assert exported.returncode == 0, exported.stderr[-2000:]
    refused = llmforge("export", "hf", str(finetune_run / "checkpoints/prompt/step-4"), str(tmp_path / "hf2"))
    assert refused.returncode == 2 and "prompt_tuning checkpoint" in refused.stderr


def test_killed_and_resumed_finetunes_match_the_uninterrupted_run(finetune_run, spec_path):
    run_dir = spec_path.parent / "killed"
    killed = llmforge("run", str(spec_path), "--run-dir", str(run_dir), env={"LLMFORGE_FAULT": KILL_IN_LORA})
    assert killed.returncode == -9
    again = llmforge("run", str(spec_path), "--run-dir", str(run_dir), "--resume", env={"LLMFORGE_FAULT": KILL_IN_RL})
    assert again.returncode == -9 and "[lora] resumed from" in again.stdout
    done = llmforge("run", str(spec_path), "--run-dir", str(run_dir), "--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "[rl] resumed from" in done.stdout and "step-3" in done.stdout
    assert _comparable(run_dir) == _comparable(finetune_run)  # bitwise: same floats, same rows


def _tensors(folder: Path) -> dict:
    """Every tensor of a torch_dist checkpoint folder, by key."""
    import tempfile

    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(folder, Path(tmp) / "all.pt")
        state = torch.load(Path(tmp) / "all.pt", weights_only=False)
    flat: dict = {}

    def walk(node: dict, prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                flat[f"{prefix}{key}"] = value

    walk(state, "")
    return flat


def test_finetune_checkpoints_written_in_the_background_are_those_written_at_once(finetune_run, spec_path):
    """The frozen-base stages' saves (adapters, a soft prompt) staged by `deferred_writes`, written by the writer thread."""
    import torch

    run_dir = spec_path.parent / "background"
    done = llmforge("run", str(spec_path), "--run-dir", str(run_dir), "checkpoint.async_save=true")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "lora/step-3 (written in the background)" in done.stdout and "prompt/step-3 (written in the background)" in done.stdout
    assert _comparable(run_dir) == _comparable(finetune_run)  # bitwise: same floats, same rows
    for stage, folder in (("lora", "adapters"), ("prompt", "prompt")):
        ours, theirs = (_tensors(run / "checkpoints" / stage / "step-3" / folder) for run in (run_dir, finetune_run))
        assert ours.keys() == theirs.keys() and len(ours) > 2
        for key, value in theirs.items():
            assert torch.equal(ours[key], value) if isinstance(value, torch.Tensor) else ours[key] == value, (stage, key)


# Metrics that count right answers must match exactly; scores and log-prob based ones to float
# order (two pipeline stages sum in another order), through 4 AdamW steps of each stage. (The RL
# stage's rewards include a reward model's score, a float.)
EXACT = ("exact_match", "rm_accuracy", "pref_win_rate", "reward/exact_match")


LAYOUTS = {"pp2": ["parallelism.pipeline_model_parallel_size=2"],
           "tp2_sp": ["parallelism.tensor_model_parallel_size=2", "parallelism.sequence_parallel=true"]}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_stage_and_evaluator_runs_at_two_process_layouts_like_one_process(finetune_run, spec_path, layout):
    """Issue 18: the same spec at PP=2 (two processes, one layer each) and at TP=2 with sequence
    parallelism: every stage trains, every evaluator reports what it reports in one process, and
    the rollouts sample the same."""
    run_dir = spec_path.parent / layout
    proc = llmforge("run", str(spec_path), "--run-dir", str(run_dir), "--nproc-per-node", "2", *LAYOUTS[layout],
                    "parallelism.nproc_per_node=2", timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    want, got = rows(finetune_run, "eval"), rows(run_dir, "eval")
    assert [(r["stage"], r["step"]) for r in got] == [(r["stage"], r["step"]) for r in want]
    for one, two in zip(want, got):
        assert set(one) == set(two), (one["stage"], set(one) ^ set(two))  # no metric goes missing at PP=2
        for key, value in one.items():
            if isinstance(value, float) and key not in TIMING:
                if key in EXACT:
                    assert two[key] == value, (one["stage"], one["step"], key, two[key], value)
                else:
                    assert two[key] == pytest.approx(value, rel=1e-4, abs=1e-5), (one["stage"], one["step"], key)
    # The same completions sampled: the same lengths and exact-match rewards, the same scores to float order.
    pick = lambda r: (r["completion_tokens"], r["reward/exact_match"])  # noqa: E731
    assert [pick(r) for r in rows(run_dir, "rollout")] == [pick(r) for r in rows(finetune_run, "rollout")]
    assert [r["reward_mean"] for r in rows(run_dir, "rollout")] == pytest.approx([r["reward_mean"] for r in rows(finetune_run, "rollout")],
                                                                                rel=1e-4)
    if layout == "pp2":  # a soft prompt lives on the first stage only: generate from it at PP=2 and in one process
        source = str(run_dir / "checkpoints/prompt/step-4")
        args = ("--prompt", "12+30=", "--temperature", "0", "--max-new-tokens", "4")
        one = llmforge("generate", source, *args)
        two = llmforge("generate", source, *args, "parallelism.pipeline_model_parallel_size=2")
        assert one.returncode == two.returncode == 0, one.stderr[-2000:] + two.stderr[-2000:]
        assert two.stdout == one.stdout and "PP 2" in two.stderr


# --- megatron's bf16 -----------------------------------------------------------------------------


def _in_bf16(spec: dict) -> dict:
    """The same spec with every training stage in megatron's bf16 (bf16 weights, fp32 master weights)."""
    stages = [{**s, "train": {**s["train"], "precision": "bf16"}} if "train" in s else s for s in spec["stages"]]
    return {**spec, "stages": stages}


def _saved_dtypes(model_dir: Path) -> set[str]:
    from megatron.core import dist_checkpointing

    return {str(t.dtype) for t in dist_checkpointing.load_tensors_metadata(str(model_dir)).values()}


def test_every_stage_trains_a_bf16_model_resumes_bitwise_and_its_checkpoints_serve(tmp_path):
    """Issue 22: LoRA, prompt tuning, DPO, the reward model and RL on bf16 models, end to end; the
    same two kills as the fp32 run, and its checkpoints through `generate` and `export`."""
    spec_path = tmp_path / "bf16.yaml"
    spec_path.write_text(yaml.safe_dump(_in_bf16(SPEC), sort_keys=False))
    whole = tmp_path / "run"
    proc = llmforge("run", str(spec_path), "--run-dir", str(whole))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ckpt = whole / "checkpoints"
    for model_dir in ("sft/step-4/model", "lora/step-4/model", "rm/step-4/model", "rl/step-4/model", "lora/step-3/adapters",
                      "prompt/step-4/prompt"):
        assert _saved_dtypes(ckpt / model_dir) <= {"torch.bfloat16", "torch.float32"}, model_dir  # fp32: master weights, Adam
        assert "torch.bfloat16" in _saved_dtypes(ckpt / model_dir), model_dir
    evals = rows(whole, "eval")
    dpo_start = next(r for r in evals if r["stage"] == "dpo" and r["step"] == 0)
    assert dpo_start["dpo_reward_margin"] == 0.0 and dpo_start["val_loss"] == pytest.approx(0.6931, abs=1e-4)
    assert {r["stage"] for r in rows(whole, "train")} >= {"lora", "prompt", "dpo", "rm", "rl"}

    killed = tmp_path / "killed"
    assert llmforge("run", str(spec_path), "--run-dir", str(killed), env={"LLMFORGE_FAULT": KILL_IN_LORA}).returncode == -9
    again = llmforge("run", str(spec_path), "--run-dir", str(killed), "--resume", env={"LLMFORGE_FAULT": KILL_IN_RL})
    assert again.returncode == -9 and "[lora] resumed from" in again.stdout
    done = llmforge("run", str(spec_path), "--run-dir", str(killed), "--resume")
    assert done.returncode == 0 and "[rl] resumed from" in done.stdout, done.stderr[-3000:]
    assert _comparable(killed) == _comparable(whole)  # bitwise: fp32 master weights and Adam state resume exactly

    for source in ("lora/step-3", "prompt/step-4"):  # a bf16 base with adapters to merge, a soft prompt
        proc = llmforge("generate", str(ckpt / source), "--prompt", "12+30=", "--temperature", "0", "--max-new-tokens", "4")
        assert proc.returncode == 0, (source, proc.stderr[-2000:])
    exported = llmforge("export", "hf", str(ckpt / "rl/step-4"), str(tmp_path / "hf"))  # bf16 weights into the fp32 export model
    assert exported.returncode == 0 and "self-check" in exported.stdout + exported.stderr, exported.stderr[-2000:]
