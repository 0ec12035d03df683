"""`llmforge eval` and the `lm_eval` evaluator on the tiny spec's checkpoints with the shipped local tasks, as a
user runs them: a run (prepare → pretrain with the evaluator in its list → prompt tuning → LoRA without merging), the
evaluator's metrics in metrics.jsonl under each task's name, `llmforge eval --stage pretrain` giving the same numbers
from the checkpoint, results kept unless --overwrite, the prompt-tuning checkpoint evaluated behind its soft prompt,
and the LoRA checkpoint (merged on load) evaluated by two data-parallel replicas (a torchrun relaunch) answering as
the harness's hf backend on its merged export."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow
lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("transformers")

from llmforge.testing import TINY_SPEC, run_spec  # noqa: E402

ROOT = Path(__file__).resolve().parents[3]
TASKS_DIR = ROOT / "examples" / "eval_tasks"
LIMIT, FEWSHOT, BATCH = 8, 1, 4
ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
TRAIN = {"micro_batch_size": 4, "global_batch_size": 8, "optimizer": {"name": "adamw", "lr": 1e-2},
         "lr_schedule": {"name": "constant", "warmup_steps": 0}, "precision": "fp32"}
SPEC = {
    "extends": str(TINY_SPEC),
    "stages": [
        {"name": "prepare", "type": "prepare"},
        {"name": "pretrain", "type": "pretrain", "train": {**TRAIN, "max_steps": 4, "eval_interval": 2, "eval_iters": 1},
         "evaluators": [{"name": "val_loss"},
                        {"name": "lm_eval", "tasks": ["llmforge_add2"], "include_path": [str(TASKS_DIR)], "limit": LIMIT,
                         "num_fewshot": FEWSHOT}]},
        {"name": "tune", "type": "prompt_tuning", "init_from": "pretrain", "max_seq_length": 16, "prompt_tuning": {"num_virtual_tokens": 4},
         "data": {"sources": {"add": {"name": "tasks", "tasks": ["add2"], "num_examples": 64}}, "val_fraction": 0},
         "train": {**TRAIN, "max_steps": 2}, "evaluators": []},
        {"name": "lora", "type": "lora", "init_from": "pretrain", "max_seq_length": 16, "lora": {"rank": 4, "alpha": 8.0, "merge": False},
         "data": {"sources": {"add": {"name": "tasks", "tasks": ["add2"], "num_examples": 64}}, "val_fraction": 0},
         "train": {**TRAIN, "max_steps": 2}, "evaluators": []},
    ],
}


def task_args(fewshot: int = FEWSHOT) -> list[str]:
    return ["--tasks", "llmforge_add2", "--include-path", str(TASKS_DIR), "--limit", str(LIMIT), "--num-fewshot", str(fewshot),
            "--batch-size", str(BATCH)]


def llmforge_eval(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmforge.cli", "eval", *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **ENV, "OMP_NUM_THREADS": "1"}, cwd=ROOT)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm-eval-run")
    spec = root / "spec.yaml"
    spec.write_text(yaml.safe_dump(SPEC, sort_keys=False))
    rows = run_spec(spec=spec, run_dir=root / "run", env=ENV)
    return root / "run", rows


def test_the_evaluator_writes_each_tasks_metrics_at_every_evaluation(run):
    _, rows = run
    evals = [r for r in rows if r["kind"] == "eval" and r["stage"] == "pretrain"]
    assert [r["step"] for r in evals] == [2, 4]
    for row in evals:
        assert {"llmforge_add2_mc/acc", "llmforge_add2_mc/acc_norm", "llmforge_add2_gen/exact_match", "llmforge_add2_ppl/word_perplexity",
                "llmforge_add2_ppl/byte_perplexity", "llmforge_add2_ppl/bits_per_byte", "val_loss"} <= set(row)
        assert 0 <= row["llmforge_add2_mc/acc"] <= 1 and row["llmforge_add2_ppl/bits_per_byte"] > 0
    assert evals[0]["llmforge_add2_ppl/bits_per_byte"] != evals[1]["llmforge_add2_ppl/bits_per_byte"]  # each step's weights


def test_llmforge_eval_of_a_stage_checkpoint_gives_the_evaluators_numbers(run):
    from llmforge.evaluation.harness import metrics

    run_dir, rows = run
    done = llmforge_eval(str(run_dir), "--stage", "pretrain", *task_args())
    assert done.returncode == 0, done.stderr[-3000:]
    written = run_dir / "eval" / "pretrain-step-4" / "results.json"
    assert f"wrote {written}" in done.stdout and "llmforge_add2_mc" in done.stdout  # the table
    results = json.loads(written.read_text())
    assert results["config"]["model_args"]["checkpoint"] == str(run_dir / "checkpoints" / "pretrain" / "step-4")
    assert results["n-shot"]["llmforge_add2_mc"] == FEWSHOT and results["n-samples"]["llmforge_add2_mc"]["effective"] == LIMIT
    final = next(r for r in rows if r["kind"] == "eval" and r["stage"] == "pretrain" and r["step"] == 4)
    for key, value in metrics(results).items():
        assert final[key] == pytest.approx(value, rel=1e-6, abs=0), key

    again = llmforge_eval(str(run_dir), "--stage", "pretrain", *task_args())
    assert again.returncode == 2 and f"{written} exists" in again.stderr and "--overwrite" in again.stderr


def test_a_lora_checkpoint_on_two_replicas_answers_as_the_hf_backend_on_its_merged_export(run, tmp_path):
    from lm_eval.models.huggingface import HFLM

    from llmforge.evaluation.harness import task_manager
    from llmforge.interop.export import export_hf

    run_dir, _ = run
    step = run_dir / "checkpoints" / "lora" / "step-2"
    assert not (step / "model").exists()  # adapters only: merged when llmforge eval loads it
    # Zero-shot: with several replicas the harness draws each replica's few-shot examples in its own order (as in its own
    # multi-GPU runs), so only zero-shot prompts are the same as one process's.
    done = llmforge_eval(str(run_dir), "--nproc-per-node", "2", *task_args(0), "--log-samples", "--output", str(tmp_path / "ours" / "results.json"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "TP 1 × PP 1 × DP 2 over 2 processes" in done.stderr
    export_hf(step, tmp_path / "hf", log=lambda m: None)
    os.environ.update(ENV)
    lm = HFLM(pretrained=str(tmp_path / "hf"), batch_size=BATCH, device="cpu", dtype="float32", add_bos_token=True)
    theirs = lm_eval.simple_evaluate(model=lm, tasks=["llmforge_add2"], num_fewshot=0, limit=LIMIT, log_samples=True,
                                     task_manager=task_manager([str(TASKS_DIR)]))
    ours = json.loads((tmp_path / "ours" / "results.json").read_text())
    for task, samples in theirs["samples"].items():
        mine = {s["doc_id"]: s["resps"] for s in map(json.loads, (tmp_path / "ours" / f"samples_{task}.jsonl").read_text().splitlines())}
        assert sorted(mine) == sorted(s["doc_id"] for s in samples)  # both replicas' documents, gathered
        for sample in samples:
            for a, b in zip(mine[sample["doc_id"]], sample["resps"], strict=True):
                a, b = a[0], b[0]
                if isinstance(b, str):
                    assert a == b
                elif isinstance(b, (list, tuple)):
                    assert a[0] == pytest.approx(b[0], abs=1e-4) and bool(a[1]) == bool(b[1])
                else:
                    assert a == pytest.approx(b, abs=1e-4)
        for key in ("acc,none", "acc_norm,none", "exact_match,none"):
            if key in theirs["results"][task]:
                assert ours["results"][task][key] == theirs["results"][task][key]


def test_a_prompt_tuning_checkpoint_is_evaluated_behind_its_soft_prompt(run, tmp_path):
    """Prompt tuning leaves the base frozen: what changes the answers is the soft prompt before every request."""
    run_dir, rows = run
    done = llmforge_eval(str(run_dir), "--stage", "tune", *task_args(), "--output", str(tmp_path / "results.json"))
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["config"]["model_args"]["checkpoint"] == str(run_dir / "checkpoints" / "tune" / "step-2")
    base = next(r for r in rows if r["kind"] == "eval" and r["stage"] == "pretrain" and r["step"] == 4)
    tuned = results["results"]["llmforge_add2_ppl"]["bits_per_byte,none"]
    assert tuned > 0 and abs(tuned - base["llmforge_add2_ppl/bits_per_byte"]) > 1e-3
