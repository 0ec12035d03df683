"""Packed documents: what the block-causal mask costs a step, and what finetune packing gains.

    python benchmarks/run.py --only document_mask_step,sft_packing [--quick]

`document_mask_step`: the tiny spec's model and pretrain batch (8 × 256 tokens, 2 micro
batches, EOD every ~60 tokens), one TrainStep with `data.reset_position_ids`,
`reset_attention_mask` and `eod_mask_loss` against one without, on the same model and
optimizer, alternating (harness.compare); the figure is the median step-time ratio (with /
without) in the tiny spec's precision (bf16), fp32 in the details.

`sft_packing`: the tiny spec's SFT task (2-digit addition through the default chat template,
the byte tokenizer: one token per digit, as the spec's BPE with split_digits), examples per
second of a step over the same tokens per micro batch: unpacked rows of 16 tokens (the spec's
max_seq_length) × 32, against `packing: true` rows of 64 × 8; unpacked rows of 64 × 8 (no
max_seq_length tuning) in the details. Each side runs in one fresh worker process.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from harness import ROOT, compare, result

EOD_EVERY = 60


def _fastest(fn, steps: int) -> float:
    best = float("inf")
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _steps(work, precision: str, documents=None, micro_batch_size: int | None = None, seq_length: int | None = None):
    """(TrainStep on the workload's model in `precision`, its lr); one shared context."""
    from llmforge.models.gpt import build_gpt
    from llmforge.runtime.distributed import init_distributed
    from llmforge.runtime.optim import build_adamw, wrap_optimizer
    from llmforge.runtime.step import TrainStep
    from llmforge.spec.components import AdamW
    from llmforge.spec.schema import ParallelismConfig

    parallelism = ParallelismConfig()
    ctx = init_distributed(parallelism, seed=1234)
    chunks = build_gpt(work.options(), parallelism, precision=precision, seed=1234)
    optimizer = wrap_optimizer(build_adamw(AdamW(lr=work.lr), model_chunks=chunks), chunks, parallelism)
    return [TrainStep(chunks, optimizer, parallelism_ctx=ctx, seq_length=seq_length or work.seq_length,
                      micro_batch_size=micro_batch_size or work.micro_batch_size, precision=precision, clip_grad=None, documents=d)
            for d in (None, documents)]


def _mask_worker(steps: int, pairs: int, quick: bool) -> dict:
    import torch

    import workloads
    from llmforge.runtime.documents import Documents

    work = workloads.workload("tiny")
    if quick:
        work = work.shrunk(micro_batch_size=2, num_micro_batches=2)
    eod = work.model["vocab_size"] - 1
    data = workloads.batches(work)
    for batch in data:
        batch[:, EOD_EVERY::EOD_EVERY] = eod
    documents = Documents(eod, reset_position_ids=True, reset_attention_mask=True, eod_mask_loss=True)
    cases = {}
    for precision in ("bf16", "fp32"):
        plain, masked = _steps(work, precision, documents)
        for step in (plain, masked):  # first steps allocate buffers
            step(data, work.lr)
        timing = compare(lambda: _fastest(lambda: plain(data, work.lr), steps), lambda: _fastest(lambda: masked(data, work.lr), steps), pairs)
        cases[precision] = {"ratio": timing.ratio, **timing.details(), "tokens_per_step": work.tokens_per_step}
    return cases


def _sft_worker(steps: int, pairs: int, quick: bool) -> dict:
    import numpy as np
    import torch

    import workloads
    from llmforge.data.sft import PromptResponseTemplate, pack_documents, pack_examples
    from llmforge.data.tasks import instructions
    from llmforge.data.tokenizers import build_byte
    from llmforge.runtime.documents import PACKED_EXAMPLES
    from llmforge.spec.components import ByteTokenizer

    tok = build_byte(ByteTokenizer(), run_dir=Path("."), texts=[])
    template = PromptResponseTemplate(tok, "default")
    encoded = [template.encode(r) for r in instructions(["add2"], 2000, seed=1, split="train")]
    work = workloads.workload("tiny")
    micro_batches = 1 if quick else 2
    sides = {"unpacked_16": (16, 32, False), "packed_64": (64, 8, True), "unpacked_64": (64, 8, False)}
    runs, examples_per_row = {}, {}
    for name, (length, micro, packed) in sides.items():
        rows = (pack_documents if packed else pack_examples)(encoded, length, tok.pad_id)
        examples_per_row[name] = len(encoded) / len(rows.tokens)
        take = micro * micro_batches
        as_list = lambda array, dtype: list(torch.from_numpy(np.ascontiguousarray(array[:take])).to(dtype).split(micro))  # noqa: E731
        tokens, masks = as_list(rows.tokens, torch.long), as_list(rows.masks, torch.float32)
        segments = as_list(rows.segments, torch.long) if packed else None
        plain, with_documents = _steps(work, "bf16", PACKED_EXAMPLES, micro_batch_size=micro, seq_length=length)
        step = with_documents if packed else plain
        call = (lambda step=step, t=tokens, m=masks, s=segments: step(t, work.lr, m, segments=s) if s is not None else step(t, work.lr, m))
        call()
        runs[name] = (call, take)
    base_call, base_rows = runs["unpacked_16"]
    out = {"examples_per_row": examples_per_row, "encoded_examples": len(encoded)}
    for name in ("packed_64", "unpacked_64"):
        call, rows_ = runs[name]
        timing = compare(lambda: base_rows * examples_per_row["unpacked_16"] / _fastest(base_call, steps),
                         lambda call=call, rows_=rows_, name=name: rows_ * examples_per_row[name] / _fastest(call, steps), pairs)
        out[name] = {"examples_per_s_ratio": timing.ratio, **timing.details()}
    return out


def _run_worker(kind: str, *, steps: int, pairs: int, quick: bool) -> dict:
    argv = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--steps", str(steps), "--pairs", str(pairs)]
    proc = subprocess.run(argv + (["--quick"] if quick else []), cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} worker exited {proc.returncode}: {proc.stderr.strip()[-800:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def document_mask_step(quick: bool) -> dict:
    """Median step-time ratio, block-causal mask + position resets over plain causal, tiny shape, bf16."""
    cases = _run_worker("mask", steps=2 if quick else 3, pairs=1 if quick else 5, quick=quick)
    figure = cases["bf16"]["ratio"]
    return result("document_mask_step", figure, "<= 1.3", figure <= 1.3, unit="x", details={
        "cases": cases, "note": "step seconds with data.reset_position_ids/reset_attention_mask/eod_mask_loss over without, same "
        "model, optimizer and batch (EOD every 60 tokens), alternating; each measurement the fastest of a few steps"})


def sft_packing(quick: bool) -> dict:
    """Examples/s of packed SFT rows over the tiny spec's unpacked ones (same tokens per micro batch)."""
    out = _run_worker("sft", steps=2 if quick else 3, pairs=1 if quick else 5, quick=quick)
    figure = out["packed_64"]["examples_per_s_ratio"]
    return result("sft_packing", figure, ">= 1.0", figure >= 1.0, unit="x", details={
        **out, "note": "examples/s of packing: true rows of 64 tokens (micro 8) over unpacked rows of 16 (the tiny spec's "
        "max_seq_length, micro 32); unpacked_64: rows of 64 without packing, micro 8; tiny model, bf16, alternating"})


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="a documents benchmark's worker")
    parser.add_argument("--worker", choices=("mask", "sft"), required=True)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    import warnings

    warnings.filterwarnings("ignore")
    worker = {"mask": _mask_worker, "sft": _sft_worker}[args.worker]
    print(json.dumps(worker(args.steps, args.pairs, args.quick)))
