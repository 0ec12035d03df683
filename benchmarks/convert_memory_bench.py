"""`convert_memory`: peak RSS of `llmforge import hf` and `llmforge export hf` on a generated Llama 3.2 1B.

    python benchmarks/run.py --only convert_memory [--quick]

A child process makes a model of Llama-3.2-1B's shape (16 layers, hidden 2048, 32 heads, 8 kv
heads, ffn 8192, vocabulary 128256, tied, llama3 RoPE) with random bf16 weights, as transformers
makes and saves it (safetensors), into a temp dir. Then each conversion runs in a process of its
own (`python benchmarks/convert_memory_bench.py --worker import|export ...`, which calls the CLI
in-process and reports its VmHWM): the import, the export with its default self-check, and the
export with `--no-verify`. The goal is the issue's: peak RSS ≤ 1.5 × the bf16 checkpoint's size
+ 2 GiB. `--quick` converts a 4-layer, hidden-512 model of the same family instead.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import ROOT, result

GIB = 2**30
GOAL_FACTOR, GOAL_EXTRA = 1.5, 2 * GIB
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192, "rope_theta": 500000.0}
# Llama-3.2-1B's config.json, less the token ids (the model has no tokenizer here).
LLAMA_1B = {"num_hidden_layers": 16, "hidden_size": 2048, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
            "intermediate_size": 8192, "vocab_size": 128256, "tie_word_embeddings": True, "max_position_embeddings": 131072,
            "rms_norm_eps": 1e-5, "rope_parameters": LLAMA3_ROPE}
QUICK = {**LLAMA_1B, "num_hidden_layers": 4, "hidden_size": 512, "num_attention_heads": 8, "num_key_value_heads": 2,
         "intermediate_size": 1536, "vocab_size": 32000}


def _status_bytes(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def _generate(hf_dir: str, quick: bool) -> dict:
    """A random bf16 Llama of the shape, saved by transformers (a worker: its memory is its own)."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(**(QUICK if quick else LLAMA_1B))
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(hf_dir)
    return {"parameters": sum(p.numel() for p in model.parameters())}


def _convert(argv: list[str]) -> dict:
    """Run one `llmforge` command in this process; its peak RSS, and RSS once torch, megatron and transformers are imported."""
    import io
    from contextlib import redirect_stdout

    import megatron.core.models.gpt.gpt_model  # noqa: F401  (what every conversion imports first)
    import transformers  # noqa: F401  (the export's self-check)

    from llmforge.cli import main

    baseline = _status_bytes("VmRSS")
    start = time.perf_counter()
    printed = io.StringIO()
    with redirect_stdout(printed):
        code = main(argv)
    return {"exit": code, "seconds": round(time.perf_counter() - start, 1), "peak_bytes": _status_bytes("VmHWM"),
            "baseline_bytes": baseline, "output": printed.getvalue().strip().splitlines()}


def _worker(args: list[str]) -> dict:
    argv = [sys.executable, str(Path(__file__).resolve()), "--worker", *args]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:2])} worker exited {proc.returncode}: {proc.stderr.strip()[-1500:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _weights_bytes(hf_dir: Path) -> int:
    return sum(p.stat().st_size for p in hf_dir.glob("*.safetensors"))


def convert_memory(quick: bool) -> list[dict]:
    """Peak RSS of import and export (with and without its self-check) against 1.5 × the bf16 checkpoint + 2 GiB."""
    root = Path(tempfile.mkdtemp(prefix="convert-memory-"))
    try:
        hf_dir, out, back, unchecked = root / "hf", root / "imported", root / "exported", root / "exported-unchecked"
        made = _worker(["generate", str(hf_dir), *(["--quick"] if quick else [])])
        size = _weights_bytes(hf_dir)
        goal = GOAL_FACTOR * size + GOAL_EXTRA
        runs = {
            "import": _worker(["run", "import", "hf", str(hf_dir), str(out)]),
            "export": _worker(["run", "export", "hf", str(out), str(back)]),
            "export_no_verify": _worker(["run", "export", "hf", str(out), str(unchecked), "--no-verify"]),
        }
        failed = {name: run for name, run in runs.items() if run["exit"] != 0}
        if failed:
            raise RuntimeError(f"conversions failed: {json.dumps(failed)[:1500]}")
        shape = {k: v for k, v in (QUICK if quick else LLAMA_1B).items() if k != "rope_parameters"}
        common = {"checkpoint_bf16_gib": round(size / GIB, 3), "goal_gib": round(goal / GIB, 3), "parameters": made["parameters"],
                  "shape": shape, "threads": os.environ.get("OMP_NUM_THREADS") or "2"}
        rows = []
        for name, run in (("convert_memory_import", runs["import"]), ("convert_memory_export", runs["export"])):
            details = {**common, "peak_gib": round(run["peak_bytes"] / GIB, 3),
                       "baseline_gib": round(run["baseline_bytes"] / GIB, 3),
                       "peak_above_baseline_gib": round((run["peak_bytes"] - run["baseline_bytes"]) / GIB, 3),
                       "seconds": run["seconds"], "output": run["output"]}
            if name == "convert_memory_export":
                plain = runs["export_no_verify"]
                details["no_verify"] = {"peak_gib": round(plain["peak_bytes"] / GIB, 3), "seconds": plain["seconds"]}
            rows.append(result(name, round(run["peak_bytes"] / GIB, 2), f"<= {goal / GIB:.2f}", run["peak_bytes"] <= goal,
                               details, unit="GiB"))
        return rows
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="a worker of the convert_memory benchmark")
    parser.add_argument("--worker", nargs=argparse.REMAINDER, required=True,
                        help="generate HF_DIR [--quick] | run LLMFORGE-ARGS...")
    args = parser.parse_args()
    import warnings

    warnings.filterwarnings("ignore")  # megatron's "Apex is not installed" notices
    kind, rest = args.worker[0], args.worker[1:]
    if kind == "generate":
        print(json.dumps(_generate(rest[0], "--quick" in rest[1:])))
    else:
        print(json.dumps(_convert(rest)))
