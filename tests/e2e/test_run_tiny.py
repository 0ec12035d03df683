"""`llmforge run` end to end: the run dir, resume, the run-dir rules, TensorBoard."""

from __future__ import annotations

import json
import re

import pytest

from tests.e2e.conftest import TINY_SMALL, llmforge, rows

pytestmark = pytest.mark.slow


def test_tiny_spec_end_to_end(tiny_run):
    for name in ("spec.resolved.yaml", "plan.json", "env.json", "run.log", "metrics.jsonl", "tokenizer", "data/manifest.json", "tb"):
        assert (tiny_run / name).exists(), name
    plan = json.loads((tiny_run / "plan.json").read_text())
    assert [s["name"] for s in plan["stages"]] == ["prepare", "pretrain", "sft"] and len(plan["plan_hash"]) == 16
    assert all(c["provider"] == "llmforge" for s in plan["stages"] for c in s["components"])
    env = json.loads((tiny_run / "env.json").read_text())
    assert env["torch"] and env["megatron-core"] and env["layout"]["tensor_model_parallel_size"] == 1
    train = [r for r in rows(tiny_run, "train") if r["stage"] == "pretrain"]
    assert [r["step"] for r in train] == list(range(1, 13))
    assert set(train[0]) >= {"kind", "stage", "step", "tokens", "loss", "lr", "grad_norm", "tokens_per_s", "mfu"}
    assert train[-1]["tokens"] == 12 * 8 * 64
    # MFU against this CPU's measured matmul peak: a share of it, named in the log
    assert all(0.0 < r["mfu"] < 1.0 for r in train)
    assert "mfu is against 1 × this CPU's fp32 matmul peak on one core" in (tiny_run / "run.log").read_text()
    assert train[-1]["loss"] < train[0]["loss"] - 0.3  # it learns
    evals = [r for r in rows(tiny_run, "eval") if r["stage"] == "pretrain"]
    assert [r["step"] for r in evals] == [6, 12] and evals[-1]["val_ppl"] > 1
    assert 0.0 <= evals[-1]["exact_match"] <= 1.0
    sft = [r for r in rows(tiny_run) if r["stage"] == "sft"]
    assert [r["step"] for r in sft if r["kind"] == "train"] == list(range(1, 7))
    assert "exact_match" in sft[-1] and sft[-1]["val_loss"] > 0
    assert (tiny_run / "checkpoints/pretrain/step-12/COMPLETE").exists()
    assert (tiny_run / "checkpoints/sft/step-6/COMPLETE").exists()
    assert "tensorboard --logdir" in (tiny_run / "run.log").read_text()


def test_tensorboard_read_back(tiny_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tiny_run / "tb"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    scalars = acc.Tags()["scalars"]
    for tag in ("pretrain/train/loss", "pretrain/train/lr", "pretrain/train/grad_norm", "pretrain/train/tokens_per_s",
                "pretrain/val/loss", "pretrain/val/ppl"):
        assert tag in scalars, (tag, scalars)
    losses = [e.value for e in acc.Scalars("pretrain/train/loss")]
    assert losses == pytest.approx([r["loss"] for r in rows(tiny_run, "train") if r["stage"] == "pretrain"], rel=1e-6)
    assert "sft/eval/exact_match" in scalars
    assert any("sample" in t for t in acc.Tags()["tensors"]), acc.Tags()


def test_used_run_dir_is_refused_and_resume_skips_finished_stages(tiny_run):
    again = llmforge("run", "specs/tiny.yaml", *TINY_SMALL, "--run-dir", str(tiny_run))
    assert again.returncode == 2 and "--resume" in again.stderr
    resumed = llmforge("run", "specs/tiny.yaml", *TINY_SMALL, "--run-dir", str(tiny_run), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert all(f"[{s}] already done" in resumed.stdout for s in ("prepare", "pretrain", "sft"))
    changed = llmforge("run", "specs/tiny.yaml", *TINY_SMALL, "model.num_layers=3", "--run-dir", str(tiny_run), "--resume")
    assert changed.returncode == 2 and "model.num_layers: 2 -> 3" in changed.stderr


def test_kill_and_resume_is_bitwise(tiny_run, tmp_path):
    run_dir = tmp_path / "killed"
    killed = llmforge("run", "specs/tiny.yaml", *TINY_SMALL, "--run-dir", str(run_dir), env={"LLMFORGE_FAULT": "train_step@7"})
    assert killed.returncode == -9
    resumed = llmforge("run", "specs/tiny.yaml", *TINY_SMALL, "--run-dir", str(run_dir), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout and "step-4" in resumed.stdout
    want = [(r["kind"], r["step"], r.get("loss"), r.get("val_loss")) for r in rows(tiny_run)]
    got = [(r["kind"], r["step"], r.get("loss"), r.get("val_loss")) for r in rows(run_dir)]
    assert got == want  # bitwise: same floats


def test_unimplemented_component_is_refused_by_name(tmp_path):
    proc = llmforge("run", "specs/7b-pretrain.yaml", "--run-dir", str(tmp_path / "x"))
    assert proc.returncode == 2
    assert not (tmp_path / "x").exists()


def test_library_warnings_go_to_run_log_only(tmp_path):
    # The shipped precision (bf16 autocast), 3 + 3 steps: saves, and an SFT start from a checkpoint.
    short = [o for o in TINY_SMALL if not o.endswith("precision=fp32") and ".max_steps=" not in o and ".eval_interval=" not in o]
    short += ["stages.1.train.max_steps=3", "stages.2.train.max_steps=3", "stages.1.train.eval_interval=3",
              "stages.2.train.eval_interval=3", "checkpoint.interval=3"]
    run_dir = tmp_path / "run"
    proc = llmforge("run", "specs/tiny.yaml", *short, "--run-dir", str(run_dir))
    assert proc.returncode == 0, proc.stderr[-3000:]
    console = proc.stdout + proc.stderr
    assert not re.search(r"\w+Warning:", console), console
    log = (run_dir / "run.log").read_text()
    # The two library warnings this run used to raise, torch's ShardedTensor deprecation and its
    # no_dist load notice, came from the checkpoint load path, which issue 30's reader goes around
    # (runtime/dcp_read.py); tests/unit/runtime/test_log.py keeps proving where warnings go.
    for library in ("deprecating ShardedTensor", "torch.distributed is disabled"):
        assert library not in console
    assert "Mismatch dtype" not in log  # the norm's: fixed where it arose (models/layers.py)
