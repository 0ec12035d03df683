from __future__ import annotations

import math

import pytest

from llmforge.spec.components import ConstantSchedule, CosineSchedule, LinearSchedule, WSDSchedule
from llmforge.runtime import schedules


def test_cosine_warmup_then_decays_to_min():
    lr = schedules.build_cosine(CosineSchedule(warmup_steps=10, min_lr=1e-4), peak_lr=1e-3, total_steps=110)
    assert lr(0) == pytest.approx(1e-4)
    assert lr(9) == pytest.approx(1e-3)
    assert lr(60) == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr(110) == pytest.approx(1e-4)
    assert all(lr(s) >= lr(s + 1) for s in range(10, 110))


def test_linear_constant_and_wsd():
    lin = schedules.build_linear(LinearSchedule(min_lr=0.0), peak_lr=1.0, total_steps=100)
    assert lin(50) == pytest.approx(0.5)
    const = schedules.build_constant(ConstantSchedule(warmup_steps=4), peak_lr=2.0, total_steps=100)
    assert [const(s) for s in (0, 3, 50)] == [0.5, 2.0, 2.0]
    wsd = schedules.build_wsd(WSDSchedule(decay_fraction=0.2, min_lr=0.0), peak_lr=1.0, total_steps=100)
    assert wsd(79) == 1.0 and wsd(90) == pytest.approx(0.5) and wsd(100) == pytest.approx(0.0)
