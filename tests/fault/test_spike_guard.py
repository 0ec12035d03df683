"""The loss-spike guard on recorded and synthetic loss curves (promise 8): unit checks, no processes."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from llmforge.runtime.guards import SpikeGuard
from llmforge.spec.stages import SpikeConfig, TrainConfig

# 200 steps of the fault suite's tiny model (tests/fault/harness.py SPEC, max_steps=200), as metrics.jsonl logged them.
RECORDED = json.loads((Path(__file__).parent / "data" / "loss_curve_200.json").read_text())


def _run(curve: list[float], policy: str = "skip", **config) -> tuple[SpikeGuard, list[int]]:
    guard = SpikeGuard(SpikeConfig(**config), policy)
    flagged = []
    for step, loss in enumerate(curve, start=1):
        guard.allows(loss, 1.0)
        if guard.take() is not None:
            flagged.append(step)
    return guard, flagged


def _noisy_curve(seed: int, steps: int = 200, noise: float = 0.04) -> list[float]:
    # A pretraining-like curve: fast early descent, slow tail, multiplicative batch noise.
    rng = random.Random(seed)
    return [(2.0 + 2.5 * math.exp(-s / 30)) * math.exp(rng.gauss(0, noise)) for s in range(steps)]


def test_the_recorded_200_clean_steps_raise_no_spike():
    assert len(RECORDED) == 200 and RECORDED[0] > RECORDED[-1] + 1  # a real, falling curve
    assert _run(RECORDED)[1] == []


@pytest.mark.parametrize("seed", range(20))
def test_noisy_clean_curves_raise_no_spike(seed):
    assert _run(_noisy_curve(seed))[1] == []


@pytest.mark.parametrize("step", [30, 120, 199])
def test_a_100x_spike_after_warmup_is_flagged_and_kept_out_of_the_window(step):
    curve = list(RECORDED)
    curve[step - 1] *= 100
    guard, flagged = _run(curve)
    assert flagged == [step]
    assert max(guard.window) < 10  # the spike never became part of "normal"


def test_nothing_is_judged_during_warmup():
    curve = [4.0, 4.0, 400.0] + [4.0 + 0.01 * (i % 3) for i in range(130)]
    assert _run(curve, warmup_steps=5)[1] == []
    curve[129] = 400.0  # the early one has left the window by now
    assert _run(curve, warmup_steps=5)[1] == [130]


def test_a_flat_curve_tiny_deviation_is_not_a_spike():
    # σ ≈ 0: the 6σ test alone would flag a 1 % wobble; min_ratio keeps it quiet.
    curve = [1.0] * 50 + [1.01] + [1.0] * 10 + [2.0]
    assert _run(curve)[1] == [62]


@pytest.mark.parametrize(("policy", "applies"), [("ignore", True), ("skip", False), ("stop", False)])
def test_the_policy_decides_whether_the_update_lands(policy, applies):
    guard, _ = _run(RECORDED[:50], policy)
    assert guard.allows(RECORDED[49] * 100, 1.0) is applies
    assert guard.take() is not None and guard.take() is None
    assert guard.allows(RECORDED[49] * 50, 1.0) is applies and guard.consecutive == 2
    assert guard.allows(RECORDED[50], 1.0) is True and guard.consecutive == 0


def test_state_round_trips_exactly_and_is_versioned():
    guard, _ = _run(RECORDED[:80])
    again = SpikeGuard(SpikeConfig(), "skip")
    again.load_state_dict(json.loads(json.dumps(guard.state_dict())))
    assert list(again.window) == list(guard.window) and again.consecutive == guard.consecutive
    for loss in RECORDED[80:]:
        assert again.allows(loss * 3, 1.0) == guard.allows(loss * 3, 1.0)
    with pytest.raises(ValueError, match="version"):
        again.load_state_dict({"version": 99})


def test_spike_options_are_validated():
    base = {"micro_batch_size": 1, "global_batch_size": 1, "max_steps": 1}
    assert TrainConfig(**base).on_spike == "ignore"
    with pytest.raises(ValueError, match="on_spike"):
        TrainConfig(**base, on_spike="drop")
    with pytest.raises(ValueError, match="warmup_steps"):
        SpikeConfig(window=10, warmup_steps=20)
    with pytest.raises(ValueError, match="min_ratio"):
        SpikeConfig(min_ratio=0.5)


@pytest.mark.parametrize("seed", range(5))
def test_judging_the_ratio_first_decides_as_both_conditions_together(seed):
    """judge() skips the deviation pass when the loss is under min_ratio × the mean (issue 31):
    its verdicts and the spike's figures must be those of the two conditions taken together."""
    rng = random.Random(seed)
    config = SpikeConfig(window=20, warmup_steps=5, max_deviations=rng.choice([0.5, 2.0, 6.0]), min_ratio=rng.choice([1.01, 1.2, 1.5]))
    guard = SpikeGuard(config, "ignore")
    verdicts = set()
    for step in range(400):
        loss = rng.choice([rng.uniform(0.5, 3.5), 2.0 * rng.uniform(0.9, 1.1)]) if step % 7 else rng.uniform(2, 12)
        window = list(guard.window)
        expected = None
        if len(window) >= config.warmup_steps:
            mean = math.fsum(window) / len(window)
            std = math.sqrt(math.fsum((x - mean) ** 2 for x in window) / len(window))
            if loss > mean + config.max_deviations * std and loss > config.min_ratio * mean:
                expected = (loss, mean, std)
        spike = guard.judge(loss)
        assert (None if spike is None else (spike.loss, spike.mean, spike.std)) == expected
        verdicts.add(expected is None)
        guard.allows(loss, 1.0)
    assert verdicts == {True, False}  # both verdicts were reached
