"""Evaluation never costs training or a checkpoint, and val_loss means the same samples at every layout.

- val_loss covers the first eval_iters × global_batch_size val samples (Megatron-LM's meaning),
  so one checkpoint scores the same at DP=1 and DP=2.
- No val split: training runs, without val-based evaluation or a val preview.
- An evaluator that raises is logged with its traceback; training and checkpoints go on.
- A process killed during an evaluation keeps that step's checkpoint (written first), and the
  resumed run makes the evaluation up.
"""

from __future__ import annotations

import json
import re

import pytest

from tests.fault.harness import copy_run, rows, steps_saved

pytestmark = pytest.mark.slow

# One step that cannot move a weight (1e-30 is far below fp32 resolution of any weight here),
# then the end-of-stage evaluation: the score of the checkpoint itself.
SCORE_ONLY = ["stages.1.train.max_steps=1", "stages.1.train.optimizer={name: sgd, lr: 1.0e-30}",
              "stages.1.train.lr_schedule={name: constant}"]


def test_one_checkpoint_scores_the_same_val_loss_at_dp1_and_dp2(llmforge, reference, tmp_path):
    checkpoint = reference / "checkpoints/pretrain/step-40"
    want = next(r["val_loss"] for r in rows(reference, "eval") if r["step"] == 40)
    got = {}
    one = llmforge("--run-dir", str(tmp_path / "dp1"), f"stages.1.init_from={checkpoint}", *SCORE_ONLY)
    assert one.returncode == 0, one.output[-4000:]
    got[1] = rows(tmp_path / "dp1", "eval")[-1]["val_loss"]
    job = llmforge.ranks("--run-dir", str(tmp_path / "dp2"), f"stages.1.init_from={checkpoint}", *SCORE_ONLY)
    assert job.wait(600) == [0, 0], job.result(0).output[-4000:] + job.result(1).output[-2000:]
    got[2] = rows(tmp_path / "dp2", "eval")[-1]["val_loss"]
    assert got[1] == pytest.approx(want, abs=1e-6)
    assert got[2] == pytest.approx(got[1], abs=1e-6), got


def test_no_val_split_trains_without_val_evaluation(llmforge, tmp_path):
    run = tmp_path / "run"
    done = llmforge("--run-dir", str(run), "data.split.val_fraction=0", "stages.1.evaluators=[]", "logging.sample_tokens=8",
                    "stages.1.train.max_steps=20")
    assert done.returncode == 0, done.output[-4000:]
    assert done.stdout.count("no val split") == 1
    assert steps_saved(run) == [10, 20] and rows(run, "eval") == []


def test_validate_refuses_val_loss_without_a_val_split(llmforge, spec):
    from tests.fault.harness import cold

    refused = cold("validate", str(spec), "data.split.val_fraction=0")
    assert refused.returncode == 2 and "data.split.val_fraction" in refused.stderr and "val_loss" in refused.stderr


def test_a_failing_evaluator_costs_neither_training_nor_a_checkpoint(llmforge, reference, tmp_path):
    broken = tmp_path / "mc.jsonl"
    broken.write_text(json.dumps({"prompt": "1+1=", "choices": [], "answer": 0}) + "\n")  # no choice to pick: raises
    run = tmp_path / "run"
    done = llmforge("--run-dir", str(run), f"stages.1.evaluators=[{{name: val_loss}}, {{name: multiple_choice, paths: [{broken}]}}]")
    assert done.returncode == 0, done.output[-4000:]
    # One line per evaluation (steps 20 and 40) naming the evaluator, its provider and the exception.
    failed = re.findall(r"evaluator 'multiple_choice' \(llmforge [^)]+\) failed: ValueError: [^\n]*; training continues", done.stdout)
    assert len(failed) == 2, done.stdout[-4000:]
    log = (run / "run.log").read_text()
    assert "Traceback" in log and "ValueError" in log
    assert steps_saved(run) == [30, 40]
    assert [(r["step"], r["val_loss"]) for r in rows(run, "eval")] == [(r["step"], r["val_loss"]) for r in rows(reference, "eval")]
    assert [r["loss"] for r in rows(run)] == [r["loss"] for r in rows(reference)]


def test_killed_during_an_evaluation_keeps_the_checkpoint_and_evaluates_on_resume(llmforge, reference, tmp_path):
    run = tmp_path / "run"
    killed = llmforge("--run-dir", str(run), env={"LLMFORGE_FAULT": "evaluate@1"})
    assert killed.returncode == -9, killed.output[-4000:]
    assert steps_saved(run) == [10, 20] and rows(run, "eval") == []  # step 20's checkpoint came first
    resumed = llmforge("--run-dir", str(copy_run(run, tmp_path / "resumed")), "--resume")
    assert resumed.returncode == 0, resumed.output[-4000:]
    assert rows(tmp_path / "resumed", "eval") == rows(reference, "eval")


def test_a_finetune_val_loss_is_the_same_at_dp1_and_dp2(llmforge, sft_spec, tmp_path):
    """The SFT stage's score of one checkpoint (its init_from, unmoved) at two layouts."""
    base = tmp_path / "base"
    done = llmforge("--run-dir", str(base), "stages.2.train.max_steps=1", spec=sft_spec)
    assert done.returncode == 0, done.output[-4000:]
    overrides = [f"stages.2.init_from={base / 'checkpoints/pretrain/step-6'}", "stages.2.train.micro_batch_size=4",
                 "stages.2.train.eval_iters=2", *(o.replace("stages.1.", "stages.2.") for o in SCORE_ONLY)]
    one = llmforge("--run-dir", str(tmp_path / "dp1"), *overrides, spec=sft_spec)
    assert one.returncode == 0, one.output[-4000:]
    job = llmforge.ranks("--run-dir", str(tmp_path / "dp2"), *overrides, spec=sft_spec)
    assert job.wait(600) == [0, 0], job.result(0).output[-4000:] + job.result(1).output[-2000:]
    scores = [rows(tmp_path / run, "eval", stage="sft")[-1]["val_loss"] for run in ("dp1", "dp2")]
    assert scores[1] == pytest.approx(scores[0], abs=1e-6), scores
