"""tokens_per_s and mfu measure training: evaluations and checkpoint saves between two log lines are not in them."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from llmforge.runtime.train import Loop

STEP_S, PAUSE_S = 0.01, 0.3


def _rows(*, eval_interval: int | None, checkpoint_interval: int | None) -> list[dict]:
    rows: list[dict] = []

    def step_fn(batch, lr):
        time.sleep(STEP_S)
        return SimpleNamespace(loss=1.0, grad_norm=1.0, nonfinite=False)

    def pause(*args):
        time.sleep(PAUSE_S)
        return {"val_loss": 1.0} if len(args) == 1 else Path("saved")

    loader = SimpleNamespace(next_global_batch=lambda: None, state_dict=lambda: {})
    ckpt = SimpleNamespace(save=lambda step, write, state: pause(step, write, state), settle=lambda timeout=None: None)
    train = SimpleNamespace(eval_interval=eval_interval, on_nonfinite="skip", lr_schedule=SimpleNamespace(name="constant"))
    loop = Loop(stage="pretrain", train=train, total=8, step_fn=step_fn, loader=loader, schedule=lambda step: 1e-3,
                evaluate=pause if eval_interval else None, metrics=SimpleNamespace(write=rows.append), log=lambda message: None,
                ckpt=ckpt, checkpoint_interval=checkpoint_interval, save_model=None, load_model=None, rng=SimpleNamespace(seed=1),
                tokens_per_step=100, flops_per_token=6.0, peak_flops=1e4, rank=0, memory_fn=lambda: 0.0, log_interval=4)
    loop.run()
    return [row for row in rows if row["kind"] == "train"]


@pytest.mark.parametrize("eval_interval, checkpoint_interval", [(2, None), (None, 2)])
def test_the_interval_after_an_evaluation_or_a_save_reads_the_training_rate(eval_interval, checkpoint_interval):
    rows = _rows(eval_interval=eval_interval, checkpoint_interval=checkpoint_interval)
    assert [row["step"] for row in rows] == [4, 8]
    for row in rows:
        # 4 steps of 10 ms: 400 tokens in ~40 ms, not in the ~0.6 s with two pauses in the interval
        seconds = 400 / row["tokens_per_s"]
        assert 4 * STEP_S <= seconds < 4 * STEP_S + PAUSE_S / 2, row
        assert row["mfu"] == pytest.approx(row["tokens_per_s"] * 6.0 / 1e4)


def test_an_mfu_above_one_says_the_peak_is_wrong_once():
    logged: list[str] = []
    train = SimpleNamespace(eval_interval=None, on_nonfinite="skip", lr_schedule=SimpleNamespace(name="constant"))
    loop = Loop(stage="pretrain", train=train, total=4, step_fn=lambda batch, lr: SimpleNamespace(loss=1.0, grad_norm=1.0, nonfinite=False),
                loader=SimpleNamespace(next_global_batch=lambda: None, state_dict=lambda: {}), schedule=lambda step: 1e-3, evaluate=None,
                metrics=SimpleNamespace(write=lambda row: None), log=logged.append, ckpt=SimpleNamespace(save=lambda *a: Path("x"), settle=lambda timeout=None: None),
                checkpoint_interval=None, save_model=None, load_model=None, rng=SimpleNamespace(seed=1), tokens_per_step=100,
                flops_per_token=6.0, peak_flops=1.0, rank=0, memory_fn=lambda: 0.0, log_interval=1, peak_source="a peak far too low")
    loop.run()
    warnings = [line for line in logged if line.startswith("warning:")]
    assert len(warnings) == 1 and "above 100%" in warnings[0] and "(a peak far too low)" in warnings[0] and "LLMFORGE_PEAK_FLOPS" in warnings[0]
