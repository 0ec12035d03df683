"""A few AdamW steps of the tiny spec's model on the carried tiny data, on whatever device is present.

`test_parity.py` runs them on a GPU and compares with `cpu_reference.json`, which this
module writes on a CPU machine (torch with no CUDA, so `cpu_compat` is installed):

    python benchmarks/gpu_check.py --prepare     # the carried data, then this reference if stale
    python -m tests.gpu.reference                # or: only (re)write the reference

The reference is tied to the carried data by its manifest hash: data prepared elsewhere
(another standard library) needs a new reference, and the GPU test says so.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
CARRY_DIR = ROOT / ".gpu_data"
TINY_RUN = CARRY_DIR / "tiny"  # a run dir holding data/ and tokenizer/ only
FIXTURE = Path(__file__).with_name("cpu_reference.json")
REFERENCE_VERSION = 1
STEPS = 4
PRECISIONS = ("fp32", "bf16", "bf16-autocast")


def tiny_setup() -> dict[str, Any]:
    """The model, optimizer and batch settings of specs/tiny.yaml's pretrain stage, as plain data."""
    from llmforge.spec.validate import load_and_validate

    spec, _ = load_and_validate(str(ROOT / "specs" / "tiny.yaml"), check_inputs=False)
    train = next(s for s in spec.stages if s.type == "pretrain").train
    return {
        "model": spec.model.model_dump(mode="json", exclude={"name"}),
        "optimizer": train.optimizer.model_dump(mode="json", exclude={"name"}),
        "clip_grad": train.clip_grad,
        "micro_batch_size": train.micro_batch_size,
        "global_batch_size": train.global_batch_size,
        "seed": spec.seed,
        "steps": STEPS,
    }


def data_fingerprint(run_dir: Path = TINY_RUN) -> dict[str, str]:
    """What identifies the carried shards: the manifest's inputs hash and the tokenizer's checksum."""
    from llmforge.data.manifest import read_manifest

    manifest = read_manifest(run_dir / "data")
    return {"inputs_hash": manifest["inputs_hash"], "tokenizer_sha256": manifest["tokenizer"]["sha256"]}


def train(setup: dict[str, Any], *, precision: str, run_dir: Path = TINY_RUN) -> dict[str, list[float]]:
    """Losses and grad norms of `setup["steps"]` steps from the layout-invariant init, at a constant lr.

    Built the way the pretrain stage builds it (megatron DDP, FP32Optimizer, TrainStep), in
    one process: gloo and the CPU shims without CUDA, nccl and none of them with it.
    """
    from llmforge.data.loader import TokenLoader
    from llmforge.models.gpt import build_gpt
    from llmforge.runtime.distributed import init_distributed
    from llmforge.runtime.optim import build_adamw, wrap_optimizer
    from llmforge.runtime.step import TrainStep
    from llmforge.spec.components import AdamW, GPTModel
    from llmforge.spec.schema import ParallelismConfig

    parallelism = ParallelismConfig()
    ctx = init_distributed(parallelism, seed=setup["seed"])
    model = GPTModel(**setup["model"])
    options = AdamW(**setup["optimizer"])
    chunks = build_gpt(model, parallelism, precision=precision, seed=setup["seed"])
    optimizer = wrap_optimizer(build_adamw(options, model_chunks=chunks), chunks, parallelism)
    step = TrainStep(chunks, optimizer, parallelism_ctx=ctx, seq_length=model.seq_length, micro_batch_size=setup["micro_batch_size"],
                     precision=precision, clip_grad=setup["clip_grad"])
    loader = TokenLoader(run_dir / "data", "train", global_batch_size=setup["global_batch_size"], micro_batch_size=setup["micro_batch_size"],
                         seed=setup["seed"], vocab_size=model.vocab_size)
    losses, grad_norms = [], []
    try:
        for _ in range(setup["steps"]):
            result = step(loader.next_global_batch(), options.lr)
            losses.append(result.loss)
            grad_norms.append(result.grad_norm)
    finally:
        loader.close()
    return {"losses": losses, "grad_norms": grad_norms}


def write_reference(path: Path = FIXTURE, run_dir: Path = TINY_RUN) -> dict[str, Any]:
    """Run every precision on this (CPU) machine and write the fixture atomically."""
    import torch

    from llmforge.atomic import atomic_write_text
    from llmforge.runtime.distributed import shutdown

    if torch.cuda.is_available():
        raise SystemExit("the reference is a CPU run: hide the GPU (CUDA_VISIBLE_DEVICES=) and run again")
    setup = tiny_setup()
    start = time.perf_counter()
    try:
        runs = {precision: train(setup, precision=precision, run_dir=run_dir) for precision in PRECISIONS}
    finally:
        shutdown()
    reference = {
        "version": REFERENCE_VERSION,
        "made_by": "python -m tests.gpu.reference",
        "torch": torch.__version__,
        "data": data_fingerprint(run_dir),
        "setup": setup,
        "runs": runs,
    }
    atomic_write_text(path, json.dumps(reference, indent=2) + "\n")
    print(f"wrote {path} ({time.perf_counter() - start:.1f} s): " + "; ".join(f"{p} losses {r['losses']}" for p, r in runs.items()))
    return reference


def read_reference(path: Path = FIXTURE) -> dict[str, Any]:
    reference = json.loads(path.read_text())
    if reference.get("version") != REFERENCE_VERSION:
        raise ValueError(f"{path}: reference version {reference.get('version')!r}, this code reads {REFERENCE_VERSION}")
    return reference


def is_current(path: Path = FIXTURE, run_dir: Path = TINY_RUN) -> bool:
    """Whether the fixture was made from the carried data and the current tiny spec."""
    if not path.is_file():
        return False
    reference = read_reference(path)
    return reference["data"] == data_fingerprint(run_dir) and reference["setup"] == tiny_setup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--if-stale", action="store_true", help="write only when the data or the tiny spec changed")
    args = parser.parse_args(argv)
    if not (TINY_RUN / "data" / "manifest.json").is_file():
        print(f"no carried data in {TINY_RUN}: run `python benchmarks/gpu_check.py --prepare` first", file=sys.stderr)
        return 2
    if args.if_stale and is_current():
        print(f"{FIXTURE} is current")
        return 0
    write_reference()
    return 0


if __name__ == "__main__":
    sys.exit(main())
