"""`generate_speed`: tokens/s of llmforge's cached decoding against recomputing the whole sequence per token.

    python benchmarks/run.py --only generate_speed [--quick]

One worker process (`python benchmarks/generate_bench.py --worker`) builds specs/tiny.yaml's
model in fp32 as the pretrain stage does (`build_gpt`; its QKV weights × 8, so that greedy
output is not one repeated token) and continues the same random prompts greedily two ways:
llmforge's `runtime.serve.ModelServer.generate` (a prefill, then one `StageDecoder` step per
token: the path evaluators, RL rollouts and `llmforge generate` use at every layout), and the model's full forward over the whole sequence for every new token, taking
the last position's argmax. Both must produce the same tokens, or the figure means nothing:
the worker checks that on every run and fails otherwise. Measurements alternate
(harness.compare); the figure is the median of cached / full tokens/s per pair at batch 1.
Batch 8 is reported as a detail.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from harness import ROOT, compare, result

GOAL = 3.0
PROMPT_LENGTH = 16
BATCH_SIZES = (1, 8)  # the first decides the figure
QKV_SCALE = 8.0


def _full_recompute(model, prompts: list[list[int]], max_new_tokens: int, gaps: list[float] | None = None) -> list[list[int]]:
    """Greedy continuation by a full forward over the whole sequence per token.

    Args:
        gaps: when given, receives each step's smallest top-1 / top-2 logit gap (how close a tie came).
    """
    import torch

    tokens = torch.tensor(prompts)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            positions = torch.arange(tokens.shape[1]).expand(tokens.shape[0], -1)
            last = model(tokens, positions, None, runtime_gather_output=True)[:, -1].float()
            if gaps is not None:
                top2 = last.topk(2, dim=-1).values
                gaps.append((top2[:, 0] - top2[:, 1]).min().item())
            tokens = torch.cat([tokens, last.argmax(dim=-1, keepdim=True)], dim=1)
    return tokens[:, len(prompts[0]):].tolist()


def _first_difference(cached: list[list[int]], full: list[list[int]]) -> str:
    for row, (a, b) in enumerate(zip(cached, full)):
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                return f"row {row}, new token {i}: cached {x}, full recompute {y}"
        if len(a) != len(b):
            return f"row {row}: cached gave {len(a)} tokens, full recompute {len(b)}"
    return "none"


def _worker(*, new_tokens: int, pairs: int, repeats: int) -> dict:
    import torch

    import workloads
    from llmforge.models.gpt import build_gpt
    from llmforge.runtime.distributed import init_distributed, shutdown
    from llmforge.runtime.serve import ModelServer
    from llmforge.spec.schema import ParallelismConfig

    work = workloads.tiny_workload()
    init_distributed(ParallelismConfig(), seed=1234)
    (model,) = build_gpt(work.options(), ParallelismConfig(), precision="fp32", seed=1234)
    model.eval()
    # From the initial weights greedy decoding mostly repeats one token, which some wrong caches would
    # repeat too; sharper attention (as tests/unit/runtime/test_generate.py does) varies the output.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("linear_qkv.weight"):
                param.mul_(QKV_SCALE)
    server = ModelServer([model])

    def generate(model, prompts, *, max_new_tokens):
        return server.generate(prompts, max_new_tokens=max_new_tokens)

    vocab = work.model["vocab_size"]
    generator = torch.Generator().manual_seed(0)
    cases = {}
    for batch in BATCH_SIZES:
        prompts = torch.randint(0, vocab, (batch, PROMPT_LENGTH), generator=generator).tolist()
        gaps: list[float] = []
        expected = _full_recompute(model, prompts, new_tokens, gaps)  # also the warm-up of both paths
        cached = generate(model, prompts, max_new_tokens=new_tokens)
        if cached != expected:
            raise RuntimeError(f"batch {batch}: cached decoding and full recomputation chose different greedy tokens "
                               f"({_first_difference(cached, expected)}); the speed ratio would compare different work")

        def rate(run) -> float:
            # The fastest of `repeats` runs (other jobs only ever slow one down); every run is checked.
            best = float("inf")
            for _ in range(repeats):
                start = time.perf_counter()
                out = run()
                best = min(best, time.perf_counter() - start)
                if out != expected:
                    raise RuntimeError(f"batch {batch}: greedy tokens changed between runs ({_first_difference(out, expected)})")
            return batch * new_tokens / best

        pair = compare(lambda: rate(lambda: _full_recompute(model, prompts, new_tokens)),
                       lambda: rate(lambda: generate(model, prompts, max_new_tokens=new_tokens)), pairs)
        cases[f"batch_{batch}"] = {
            "ratio": round(pair.ratio, 3),
            "cached_tokens_per_s": round(statistics.median(pair.subject), 1),
            "full_recompute_tokens_per_s": round(statistics.median(pair.baseline), 1),
            "ratios": [round(r, 3) for r in pair.ratios],
            "same_tokens": True,  # checked above: a difference raises
            "distinct_new_tokens": len({t for row in expected for t in row}),
            "smallest_top2_logit_gap": round(min(gaps), 6),
        }
    shutdown()
    return {"cases": cases, "threads": torch.get_num_threads()}


def generate_speed(quick: bool) -> dict:
    """Median cached / full-recompute tokens/s per alternating pair, greedy, batch 1."""
    new_tokens, pairs, repeats = (16, 1, 1) if quick else (64, 5, 2)
    argv = [sys.executable, str(Path(__file__).resolve()), "--worker", "--new-tokens", str(new_tokens),
            "--pairs", str(pairs), "--repeats", str(repeats)]
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"generate_speed worker exited {proc.returncode}: {proc.stderr.strip()[-800:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    figure = out["cases"][f"batch_{BATCH_SIZES[0]}"]["ratio"]
    return result("generate_speed", figure, f">= {GOAL}", figure >= GOAL, unit="x", details={
        **out,
        "workload": f"specs/tiny.yaml model (initial weights, QKV weights × {QKV_SCALE:g}), fp32, one process, greedy; "
                    f"prompts of {PROMPT_LENGTH} random tokens, {new_tokens} new tokens",
        "pairs": pairs,
        "runs_per_measurement": repeats,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS") or "all cores",
        "note": "figure = median over alternating pairs of cached tokens/s (runtime.serve.ModelServer.generate) over "
                "full-recompute tokens/s (the model's forward over the whole sequence for each new token), batch 1; "
                "both sides' greedy tokens are checked equal on every run",
    })


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="cached against full-recompute generation (the worker of generate_speed)")
    parser.add_argument("--worker", action="store_true", required=True)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    import warnings

    warnings.filterwarnings("ignore")  # megatron's "Apex is not installed" notices
    print(json.dumps(_worker(new_tokens=args.new_tokens, pairs=args.pairs, repeats=args.repeats)))
