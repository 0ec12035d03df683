"""RL with several updates per rollout: a bad update reaches the loop and the guards (promises 7 and 8).

The real Loop runs PolicyGradientStep (3 updates per rollout, 4 steps) with a real
SpikeGuard; the 8th update (step 3's second) goes bad: its output times NaN, or its loss
times 100 where the guard reads it (GRPO's loss at ratio 1 is −advantage whatever the model
says, so scaling the model's output would not move it). Runs in a child process
(`python test_rl_updates.py --out facts.json`) to keep megatron's global state out of pytest.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from tests.child import worker_facts

pytestmark = pytest.mark.slow

UPDATES, STEPS, BAD = 3, 4, 8
CASES = {  # name: (fault, on_nonfinite, on_spike)
    "nan_stop": ("nan", "stop", "ignore"),
    "nan_skip": ("nan", "skip", "ignore"),
    "spike_stop": ("spike", "stop", "stop"),
    "spike_skip": ("spike", "stop", "skip"),
    "spike_ignore": ("spike", "stop", "ignore"),
}


def _case(fault: str, on_nonfinite: str, on_spike: str, ctx, parallelism) -> dict:
    from types import SimpleNamespace

    import torch

    from llmforge.finetune.steps import PolicyGradientStep, Rollout
    from llmforge.models.gpt import build_gpt
    from llmforge.runtime.guards import SpikeGuard
    from llmforge.runtime.optim import build_sgd, wrap_optimizer
    from llmforge.runtime.train import Loop, TrainingStopped
    from llmforge.spec.components import SGD, GPTModel
    from llmforge.spec.stages import SpikeConfig, TrainConfig

    options = GPTModel(num_layers=1, hidden_size=32, num_attention_heads=2, vocab_size=16, seq_length=8)
    chunks = build_gpt(options, parallelism, precision="fp32", seed=1)
    optimizer = wrap_optimizer(build_sgd(SGD(lr=0.1), model_chunks=chunks), chunks, parallelism)
    step = PolicyGradientStep(chunks, optimizer, parallelism_ctx=ctx, seq_length=8, micro_batch_size=8, precision="fp32", clip_grad=None,
                              clip_epsilon=0.2, kl_coef=0.0, updates=UPDATES)
    train = TrainConfig(micro_batch_size=8, global_batch_size=8, max_steps=STEPS, on_nonfinite=on_nonfinite, on_spike=on_spike,
                        spike=SpikeConfig(window=50, warmup_steps=2))
    guard = SpikeGuard(train.spike, on_spike)

    updates = 0  # attempted: one forward each (one micro batch per step)

    def count_and_poison(module, inputs, output):
        nonlocal updates
        updates += 1
        return output * float("nan") if fault == "nan" and updates == BAD else None

    chunks[0].register_forward_hook(count_and_poison)
    step.update_guard = lambda loss, grad_norm: guard.allows(loss * 100 if fault == "spike" and updates == BAD else loss, grad_norm)

    # Advantage −1 everywhere and no old log-probs: every update's loss is exactly 1.
    tokens = torch.randint(0, 16, (8, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(8, 8)
    mask[:, 4:] = 1.0
    batch = ([tokens], [Rollout(mask, -torch.ones(8))])
    loader = SimpleNamespace(next_global_batch=lambda: batch, state_dict=lambda: {})
    log: list[str] = []
    loop = Loop(stage="rl", train=train, total=STEPS, step_fn=lambda b, lr: step(b[0], lr, b[1]), loader=loader, schedule=lambda s: 0.1,
                evaluate=None, metrics=SimpleNamespace(write=lambda row: None), log=log.append,
                ckpt=SimpleNamespace(save=lambda step, write, state: Path("unsaved"), settle=lambda **kw: None, writing=False), checkpoint_interval=None, save_model=None,
                load_model=None, rng=SimpleNamespace(seed=1), tokens_per_step=64, flops_per_token=0.0, peak_flops=0.0, rank=0,
                memory_fn=lambda: 0.0, log_interval=100, guard=guard)
    stopped = None
    try:
        loop.run()
    except TrainingStopped as e:
        stopped = str(e)
    c = loop.counters
    return {"stopped": stopped, "step": c.step, "skipped": c.skipped, "spikes": c.spikes, "updates": updates, "window": len(guard.window)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    from llmforge.runtime.distributed import init_distributed, shutdown
    from llmforge.spec.schema import ParallelismConfig

    parallelism = ParallelismConfig()
    ctx = init_distributed(parallelism, seed=1)
    args.out.write_text(json.dumps({name: _case(*case, ctx, parallelism) for name, case in CASES.items()}))
    shutdown()


@pytest.fixture(scope="module")
def facts(tmp_path_factory) -> dict:
    return worker_facts(__file__, tmp_path_factory.mktemp("rl_updates") / "facts.json")


@pytest.mark.parametrize("case", ["nan_stop", "spike_stop"])
def test_stop_stops_at_the_first_bad_update_of_a_rollout(facts, case):
    got = facts[case]
    assert got["stopped"] is not None and got["step"] == 3, got
    assert got["updates"] == BAD, got  # the rollout's third update never ran
    assert ("non-finite" if case == "nan_stop" else "loss spike") in got["stopped"]


@pytest.mark.parametrize("case", ["nan_skip", "spike_skip"])
def test_skip_ends_the_rollout_and_counts_it_once(facts, case):
    got = facts[case]
    assert got["stopped"] is None and got["step"] == STEPS, got
    assert got["skipped"] == 1 and got["updates"] == STEPS * UPDATES - 1, got
    if case == "spike_skip":
        assert got["spikes"] == 1 and got["window"] == STEPS * UPDATES - 2, got  # every clean update's loss: not the spike's


def test_an_ignored_spike_is_reported_though_later_updates_are_clean(facts):
    got = facts["spike_ignore"]
    assert got["stopped"] is None and got["spikes"] == 1 and got["skipped"] == 0, got
    assert got["updates"] == STEPS * UPDATES and got["window"] == STEPS * UPDATES - 1, got


if __name__ == "__main__":
    main()
