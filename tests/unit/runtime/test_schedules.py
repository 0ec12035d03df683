"""LR schedules at the steps the loop trains: 0 .. total-1 (it never asks for lr(total))."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest

from llmforge.runtime import schedules
from llmforge.runtime.train import Loop
from llmforge.spec.components import ConstantSchedule, CosineSchedule, LinearSchedule, WSDSchedule

PEAK, MIN_LR, TOTAL = 1e-3, 1e-4, 110


def _trained(lr, total: int = TOTAL) -> list[float]:
    return [lr(step) for step in range(total)]


def test_the_loop_trains_steps_0_to_total_minus_1():
    trained: list[float] = []  # the lr of each step trained; a checkpoint also asks for the next step's, to record it

    def step_fn(batch, lr: float):
        trained.append(lr)
        return SimpleNamespace(loss=1.0, grad_norm=0.0, nonfinite=False)

    loop = Loop(stage="pretrain", train=SimpleNamespace(eval_interval=None), total=5, step_fn=step_fn,
                loader=SimpleNamespace(next_global_batch=lambda: None, state_dict=lambda: {}), schedule=float, evaluate=None,
                metrics=SimpleNamespace(write=lambda row: None), log=lambda line: None,
                ckpt=SimpleNamespace(save=lambda step, write, state: Path("unsaved")), checkpoint_interval=None, save_model=None,
                load_model=None, rng=SimpleNamespace(seed=1), tokens_per_step=1, flops_per_token=0.0, peak_flops=0.0, rank=0,
                memory_fn=lambda: 0.0, log_interval=1)
    loop.run()
    assert trained == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("build, options", [
    (schedules.build_constant, ConstantSchedule(warmup_steps=10)),
    (schedules.build_cosine, CosineSchedule(warmup_steps=10, min_lr=MIN_LR)),
    (schedules.build_linear, LinearSchedule(warmup_steps=10, min_lr=MIN_LR)),
    (schedules.build_wsd, WSDSchedule(warmup_steps=10, min_lr=MIN_LR)),
], ids=["constant", "cosine", "linear", "wsd"])
def test_warmup_trains_from_step_0_and_reaches_the_peak_at_its_last_step(build, options):
    lrs = _trained(build(options, peak_lr=PEAK, total_steps=TOTAL))
    assert lrs[:10] == pytest.approx([PEAK * (step + 1) / 10 for step in range(10)])
    assert lrs[9] == lrs[10] == pytest.approx(PEAK)


def test_cosine_with_min_lr_decays_over_the_trained_steps():
    lrs = _trained(schedules.build_cosine(CosineSchedule(warmup_steps=10, min_lr=MIN_LR), peak_lr=PEAK, total_steps=TOTAL))
    decay = lrs[10:]
    assert all(a > b for a, b in zip(decay, decay[1:]))  # every step after warmup lowers the lr
    assert lrs[60] == pytest.approx(MIN_LR + (PEAK - MIN_LR) * 0.5)  # half-way through the decay
    # The last trained step is one step short of the end of the decay (as in Megatron-LM): just above min_lr.
    last = MIN_LR + (PEAK - MIN_LR) * 0.5 * (1 + math.cos(math.pi * 99 / 100))
    assert lrs[-1] == pytest.approx(last) and 0 < lrs[-1] - MIN_LR < 1e-3 * (PEAK - MIN_LR)


def test_cosine_holds_min_lr_after_decay_steps():
    lrs = _trained(schedules.build_cosine(CosineSchedule(warmup_steps=10, min_lr=MIN_LR, decay_steps=60), peak_lr=PEAK,
                                          total_steps=TOTAL))
    assert lrs[59] > MIN_LR and lrs[60:] == pytest.approx([MIN_LR] * 50)


def test_linear_decays_by_equal_steps():
    lrs = _trained(schedules.build_linear(LinearSchedule(min_lr=0.0), peak_lr=1.0, total_steps=100), total=100)
    assert lrs == pytest.approx([1.0 - step / 100 for step in range(100)])


def test_constant_stays_at_the_peak():
    assert _trained(schedules.build_constant(ConstantSchedule(), peak_lr=2.0, total_steps=100), total=100) == [2.0] * 100


@pytest.mark.parametrize("style, shape", [("linear", lambda p: 1 - p), ("cosine", lambda p: 0.5 * (1 + math.cos(math.pi * p))),
                                          ("sqrt", lambda p: 1 - math.sqrt(p))])
def test_wsd_is_stable_then_decays_over_its_last_fraction(style, shape):
    wsd = schedules.build_wsd(WSDSchedule(warmup_steps=5, decay_fraction=0.2, decay_style=style, min_lr=0.1), peak_lr=1.0,
                              total_steps=100)
    lrs = _trained(wsd, total=100)
    assert lrs[4:80] == [1.0] * 76  # stable from the last warmup step to the decay
    assert lrs[80:] == pytest.approx([0.1 + 0.9 * shape((step - 80) / 20) for step in range(80, 100)])
    assert all(a > b for a, b in zip(lrs[80:], lrs[81:])) and lrs[-1] > 0.1
