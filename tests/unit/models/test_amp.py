"""bf16 (autocast over fp32 parameters, and megatron's bf16 parameters) trains under full recompute as without it.

The runs happen in one child process (`python test_amp.py --out losses.json`), started with no
launcher, so megatron's global state stays out of the pytest process.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from tests.child import worker_facts

SEQ, MICRO_BATCH, VOCAB = 32, 2, 256
# GPT-2's shape has biases (fp32 residual adds under autocast), Llama's none (bf16 ones).
SHAPES = {"gpt": ("gpt2-124m", {"num_layers": 2}), "llama": ("llama2-7b", {"num_layers": 2, "num_query_groups": 2})}
PRECISIONS = ("bf16-autocast", "bf16")


def _losses(shape: str, recompute: str, context, precision: str) -> list[float]:
    import torch

    from llmforge.models.gpt import build_gpt
    from llmforge.models.presets import shrink
    from llmforge.runtime.optim import build_sgd, wrap_optimizer
    from llmforge.runtime.step import TrainStep
    from llmforge.spec.components import SGD, GPTModel
    from llmforge.spec.schema import ParallelismConfig

    preset, overrides = SHAPES[shape]
    parallelism = ParallelismConfig(recompute_granularity=recompute)
    chunks = build_gpt(GPTModel(**shrink(preset, **overrides)), parallelism, precision=precision, seed=5)
    optimizer = wrap_optimizer(build_sgd(SGD(lr=0.5), model_chunks=chunks), chunks, parallelism)
    step = TrainStep(chunks, optimizer, parallelism_ctx=context, seq_length=SEQ, micro_batch_size=MICRO_BATCH, precision=precision, clip_grad=1.0)
    generator = torch.Generator().manual_seed(11)
    losses = []
    for _ in range(3):
        start = torch.randint(0, VOCAB, (2 * MICRO_BATCH, 1), generator=generator)
        batch = (start + torch.arange(SEQ + 1)) % VOCAB
        result = step(list(batch.split(MICRO_BATCH)), 0.5)
        assert result.applied, result
        losses.append(result.loss)
    return losses


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    from llmforge.runtime.distributed import init_distributed, shutdown
    from llmforge.spec.schema import ParallelismConfig

    context = init_distributed(ParallelismConfig(), seed=5)
    losses = {f"{shape}_{precision}_{recompute}": _losses(shape, recompute, context, precision)
              for shape in SHAPES for precision in PRECISIONS for recompute in ("none", "full")}
    args.out.write_text(json.dumps(losses))
    shutdown()


@pytest.fixture(scope="module")
def losses(tmp_path_factory) -> dict:
    return worker_facts(__file__, tmp_path_factory.mktemp("amp") / "losses.json", timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("shape", SHAPES)
def test_full_recompute_trains_in_bf16_like_no_recompute(losses, shape, precision):
    plain, recomputed = losses[f"{shape}_{precision}_none"], losses[f"{shape}_{precision}_full"]
    assert plain[-1] < plain[0]  # it learns
    # The replay runs the forward's bf16 ops again, so the gradients are the same.
    assert recomputed == pytest.approx(plain, abs=1e-4)


if __name__ == "__main__":
    main()
