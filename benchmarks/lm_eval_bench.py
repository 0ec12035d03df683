"""`lm_eval_requests`: requests/s of llmforge's lm-evaluation-harness adapter against the harness's own `hf` backend.

    python benchmarks/run.py --only lm_eval_requests [--quick]

One worker process (`python benchmarks/lm_eval_bench.py --worker`) writes a run dir with
specs/tiny.yaml's model and tokenizer (4 layers × 256, Llama's switches, fp32, its initial
weights; a 4096-token BPE with one token per digit, trained on the standard library's modules) and exports it with `llmforge export hf`. The same
requests then go through the harness twice per pair, alternately: served by
`llmforge.evaluation.adapter.LlmforgeLM` over the checkpoint (what `llmforge eval` runs, one
process) and by the harness's `HFLM` over the export (`add_bos_token=True`, as llmforge's tokens
start with BOS), at the same batch size. The tasks are the shipped ones (examples/eval_tasks: a
multiple-choice, a generation and a perplexity task, 8-shot where a task takes shots). The answers
must agree (generations equal, log-likelihoods within 1e-4, the same greedy flags) or the
figure means nothing: the worker checks that on every run. The figure is the median over pairs of
adapter / hf requests per second.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

from harness import ROOT, compare, result

GOAL = 1.0
BATCH_SIZE = 8
TASKS = ["llmforge_add2_mc", "llmforge_add2_gen", "llmforge_add2_ppl"]
FEWSHOT = 8
TOLERANCE = 1e-4


def _write_run(root: Path) -> Path:
    """A run dir as a pretrain stage leaves it: spec.resolved.yaml, tokenizer/, checkpoints/pretrain/step-1."""
    import yaml

    import workloads
    from llmforge.data.tokenizers import build_bpe
    from llmforge.models.gpt import build_gpt
    from llmforge.runtime.checkpoint import CheckpointManager
    from llmforge.runtime.distributed import init_distributed, shutdown
    from llmforge.runtime.sharded_io import save_sharded
    from llmforge.spec.components import BPETokenizer, GPTModel
    from llmforge.spec.schema import ParallelismConfig

    run = root / "run"
    run.mkdir()
    # specs/tiny.yaml's tokenizer: BPE of 4096 with one token per digit, trained on the standard library's top-level modules.
    sources = (Path(f).read_text(errors="replace") for f in sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py"))))
    tokenizer = build_bpe(BPETokenizer.model_validate({"vocab_size": 4096, "split_digits": True, "train_max_mb": 8}), run_dir=run, texts=sources)
    tokenizer.save(run / "tokenizer")
    options = {**workloads.tiny_workload().model, "vocab_size": tokenizer.vocab_size}
    spec = {"name": "bench", "model": {"name": "gpt", **options}, "stages": [{"name": "pretrain", "type": "pretrain"}]}
    (run / "spec.resolved.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    init_distributed(ParallelismConfig(), seed=1234)
    (model,) = build_gpt(GPTModel.model_validate(options), ParallelismConfig(), precision="fp32", seed=1234)

    def write(tmp: Path) -> None:
        (tmp / "model").mkdir()
        save_sharded(tmp / "model", [model], None, {})

    state = {"version": 1, "stage": "pretrain", "step": 1, "tokens": 0, "skipped": 0, "extra": {}, "loader": None}
    CheckpointManager(run / "checkpoints" / "pretrain", keep_last=1, log=lambda m: None).save(1, write, state)
    shutdown()
    return run


def _answers(results: dict) -> dict[str, dict[int, list]]:
    return {task: {s["doc_id"]: [r[0] for r in s["resps"]] for s in rows} for task, rows in results["samples"].items()}


def _check_same(ours: dict, theirs: dict) -> float:
    """The largest log-likelihood difference; raises when a generation, a greedy flag or a request differs."""
    worst = 0.0
    for task, docs in theirs.items():
        if docs.keys() != ours[task].keys():
            raise RuntimeError(f"{task}: the two backends answered different documents")
        for doc, answers in docs.items():
            for a, b in zip(ours[task][doc], answers, strict=True):
                if isinstance(b, str) or isinstance(a, str):
                    same = a == b
                else:
                    a, b = (a, b) if isinstance(b, (list, tuple)) else ([a, None], [b, None])
                    worst = max(worst, abs(float(a[0]) - float(b[0])))
                    same = bool(a[1]) == bool(b[1]) and abs(float(a[0]) - float(b[0])) <= TOLERANCE
                if not same:
                    raise RuntimeError(f"{task} document {doc}: llmforge answered {a!r}, the hf backend {b!r}")
    return worst


def _worker(*, limit: int, pairs: int) -> dict:
    import torch

    os.environ.setdefault("TQDM_DISABLE", "1")
    from lm_eval.models.huggingface import HFLM

    from llmforge.evaluation import harness
    from llmforge.evaluation.adapter import LlmforgeLM
    from llmforge.interop.export import export_hf
    from llmforge.interop.generate import TextGenerator

    harness.quiet()
    with tempfile.TemporaryDirectory() as tmp:
        run = _write_run(Path(tmp))
        export_hf(run, Path(tmp) / "hf", log=lambda m: None)
        model = TextGenerator(run, template="raw")
        ours = LlmforgeLM(model.server, model.tokenizer, batch_size=BATCH_SIZE)
        theirs = HFLM(pretrained=str(Path(tmp) / "hf"), batch_size=BATCH_SIZE, add_bos_token=True, dtype="float32", device="cpu")
        manager = harness.task_manager([str(ROOT / "examples" / "eval_tasks")])
        counts: dict[str, int] = {}

        def rate(lm) -> float:
            start = time.perf_counter()
            results = harness.run(lm, manager, tasks=TASKS, num_fewshot=FEWSHOT, limit=limit, log_samples=True)
            elapsed = time.perf_counter() - start
            answers = _answers(results)
            counts.update({t: sum(len(a) for a in docs.values()) for t, docs in answers.items()})
            rate.last[lm is ours] = answers
            return sum(counts.values()) / elapsed

        rate.last = {}
        rate(theirs), rate(ours)  # warm-up of both, and the first check
        worst = _check_same(rate.last[True], rate.last[False])
        pair = compare(lambda: rate(theirs), lambda: rate(ours), pairs)
        worst = max(worst, _check_same(rate.last[True], rate.last[False]))
        model.close()
    return {"ratio": round(pair.ratio, 3), "llmforge_requests_per_s": round(statistics.median(pair.subject), 1),
            "hf_requests_per_s": round(statistics.median(pair.baseline), 1), "ratios": [round(r, 3) for r in pair.ratios],
            "requests": counts, "max_loglikelihood_difference": worst, "threads": torch.get_num_threads()}


def lm_eval_requests(quick: bool) -> dict:
    """Median adapter / hf-backend requests per second per alternating pair, fp32, one process, batch 8."""
    limit, pairs = (16, 1) if quick else (64, 5)
    argv = [sys.executable, str(Path(__file__).resolve()), "--worker", "--limit", str(limit), "--pairs", str(pairs)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"lm_eval_requests worker exited {proc.returncode}: {proc.stderr.strip()[-800:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return result("lm_eval_requests", out["ratio"], f">= {GOAL}", out["ratio"] >= GOAL, unit="x", details={
        **out,
        "workload": f"specs/tiny.yaml's model and tokenizer (initial weights; BPE 4096 on the stdlib), fp32, one process, batch {BATCH_SIZE}; "
                    f"examples/eval_tasks {', '.join(TASKS)}, {FEWSHOT}-shot, {limit} documents each",
        "pairs": pairs,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS") or "all cores",
        "note": "figure = median over alternating pairs of llmforge's adapter requests/s (llmforge eval's path) over the "
                "harness's hf backend on the `llmforge export hf` of the same checkpoint; answers checked equal on every run",
    })


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="llmforge's harness adapter against the hf backend (the worker of lm_eval_requests)")
    parser.add_argument("--worker", action="store_true", required=True)
    parser.add_argument("--limit", type=int, default=64)
    parser.add_argument("--pairs", type=int, default=5)
    args = parser.parse_args()
    import warnings

    warnings.filterwarnings("ignore")  # megatron's "Apex is not installed" notices
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    print(json.dumps(_worker(limit=args.limit, pairs=args.pairs)))
