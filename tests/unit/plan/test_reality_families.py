"""The planner against real allocations for the switches the Llama 3, Qwen2 and Qwen3 families add.

Same measurement as test_reality.py (one process): parameter, gradient and optimizer-state
bytes exactly, saved activations within 15%.
"""

from __future__ import annotations

import pytest

from tests.unit.plan.test_reality import check, measure, one_micro_batch

QWEN3 = ("model.qk_layernorm=true", "model.kv_channels=96")  # 4 heads of 96 on a 256-wide model
QWEN2 = ("model.add_qkv_bias=true", "model.num_query_groups=2")
LLAMA3 = ("model.rope_scaling_factor=8", "model.rotary_base=500000.5")
FP32 = "stages.1.train.precision=fp32"


@pytest.mark.slow
def test_family_switches_cost_what_the_plan_says(tmp_path):
    cases = [
        one_micro_batch("specs/tiny.yaml", *QWEN3),
        one_micro_batch("specs/tiny.yaml", *QWEN3, FP32),
        one_micro_batch("specs/tiny.yaml", *QWEN3, "parallelism.recompute_granularity=selective"),
        one_micro_batch("specs/tiny.yaml", *QWEN2),
        # A QKV bias keeps the projection's output in fp32 under bf16, and the q/k norms keep it alive.
        one_micro_batch("specs/tiny.yaml", *QWEN2, *QWEN3),
        one_micro_batch("specs/tiny.yaml", *QWEN2, *QWEN3, FP32),
        one_micro_batch("specs/tiny.yaml", "model.qk_layernorm=true", "model.normalization=LayerNorm"),
        one_micro_batch("specs/tiny.yaml", *LLAMA3),
    ]
    for case, ranks in zip(cases, measure(cases, 1, tmp_path)):
        check(case, ranks)
