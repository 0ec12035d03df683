"""`llmforge generate` at a layout of its own: a checkpoint trained at PP=2 gives the same text when
generated at PP=2 (`--nproc-per-node 2 parallelism.pipeline_model_parallel_size=2`, relaunched under
torchrun) as in one process, greedy and sampled with a fixed --seed; bad layout overrides exit 2.

One `llmforge run` trains the tiny model (byte tokenizer, 2-digit additions as text, 80 steps)
at PP=2 in 2 processes (gloo); the four generate commands each read several prompts with
--interactive, so every launch checks more than one continuation.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from llmforge.cli import main

ROOT = Path(__file__).resolve().parents[3]
SPEC = {
    "name": "generate-pp2",
    "seed": 5,
    "tokenizer": {"name": "byte"},
    "data": {"sources": {"text": {"name": "tasks", "tasks": ["add2"], "num_examples": 200, "seed": 3, "format": "text"}},
             "split": {"val_fraction": 0.1}},
    "model": {"name": "gpt", "num_layers": 2, "hidden_size": 32, "num_attention_heads": 2, "ffn_hidden_size": 64, "vocab_size": 320,
              "seq_length": 32, "position_embedding_type": "rope", "normalization": "RMSNorm", "activation": "swiglu",
              "add_bias_linear": False},
    "parallelism": {"pipeline_model_parallel_size": 2, "nproc_per_node": 2},
    "logging": {"log_interval": 20, "tensorboard": False, "sample_tokens": 0},
    "stages": [
        {"name": "prepare", "type": "prepare"},
        # Enough steps that the model writes digits, '+' and '=' (readable text tells tokens apart).
        {"name": "pretrain", "type": "pretrain", "evaluators": [],
         "train": {"micro_batch_size": 8, "global_batch_size": 8, "max_steps": 80, "optimizer": {"name": "adamw", "lr": 5.0e-3},
                   "lr_schedule": {"name": "constant", "warmup_steps": 1}, "eval_iters": 1}},
    ],
}
PROMPTS = "1+1\n12+30=\n7\n45+\n\n"
PP2 = ("--nproc-per-node", "2", "parallelism.pipeline_model_parallel_size=2")
_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID",
                "SLURM_PROCID", "SLURM_NTASKS", "LLMFORGE_FAULT")


def _llmforge(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "llmforge.cli", *args], cwd=ROOT, env=env, input=stdin, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def pp2_run(tmp_path_factory) -> Path:
    """A run dir whose only checkpoint was trained and saved by 2 processes at PP=2."""
    folder = tmp_path_factory.mktemp("generate-pp2")
    (folder / "spec.yaml").write_text(yaml.safe_dump(SPEC, sort_keys=False))
    done = _llmforge("run", str(folder / "spec.yaml"), "--run-dir", str(folder / "run"))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return folder / "run"


@pytest.mark.slow
@pytest.mark.parametrize("sampling", [("--temperature", "0"), ("--temperature", "1", "--top-k", "12", "--seed", "7")],
                         ids=["greedy", "sampled"])
def test_generate_at_pp2_gives_the_text_of_one_process(pp2_run, sampling, monkeypatch, capsys):
    args = ["generate", str(pp2_run), "--interactive", "--max-new-tokens", "12", *sampling]
    monkeypatch.setattr(sys, "stdin", io.StringIO(PROMPTS))
    assert main(args) == 0  # one process: this one (the default layout, no relaunch)
    one = capsys.readouterr()
    assert "over 2 processes" not in one.err
    pp2 = _llmforge(*args, *PP2, stdin=PROMPTS)
    assert pp2.returncode == 0, pp2.stdout[-2000:] + pp2.stderr[-3000:]
    # The ranks really split the model in two stages (megatron's groups, read back by the server).
    assert "TP 1 × PP 2 × DP 1 over 2 processes" in pp2.stderr, pp2.stderr[-3000:]
    answers = one.out.splitlines()
    assert len(answers) == 4 and all(a.startswith(p) for a, p in zip(answers, PROMPTS.split("\n"))), answers
    assert any(len(a) > len(p) for a, p in zip(answers, PROMPTS.split("\n"))), answers  # something was generated
    assert pp2.stdout == one.out  # only rank 0 prints, and it prints what one process does


@pytest.mark.slow
def test_generate_refuses_a_layout_that_does_not_divide_the_model(pp2_run, capsys):
    code = main(["generate", str(pp2_run), "--prompt", "1+1", "parallelism.pipeline_model_parallel_size=4"])
    err = capsys.readouterr().err
    assert code == 2 and "model.num_layers 2 is not divisible by pipeline × virtual pipeline stages 4" in err, err


@pytest.mark.parametrize(("overrides", "needles"), [
    (["parallelism.pipline_model_parallel_size=2"], ["parallelism has no key 'pipline_model_parallel_size'",
                                                      "did you mean parallelism.pipeline_model_parallel_size?"]),
    (["model.num_layers=4"], ["takes only layout overrides (parallelism.KEY=VALUE)"]),
    (["parallelism.tensor_model_parallel_size=0"], ["parallelism.tensor_model_parallel_size 0", "greater than or equal to 1"]),
    (["--nproc-per-node", "3", "parallelism.pipeline_model_parallel_size=2"],
     ["--nproc-per-node 3 is not a multiple of parallelism.tensor_model_parallel_size 1 × parallelism.pipeline_model_parallel_size 2",
      "pass --nproc-per-node 2"]),
    (["parallelism.nnodes=2"], ["runs on one machine"]),
    (["parallelism.virtual_pipeline_model_parallel_size=2"], ["needs pipeline_model_parallel_size > 1"]),
])
def test_generate_refuses_bad_layout_overrides(tmp_path, capsys, overrides, needles):
    code = main(["generate", str(tmp_path / "no-run"), "--prompt", "1+1", *overrides])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err
