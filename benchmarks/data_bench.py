"""Data pipeline benchmarks: prepare and loader throughput, as ratios against baselines measured in the same run.

    python benchmarks/data_bench.py [--quick]

Each function returns harness.result(...): {"name", "figure", "goal", "met", "unit", "details"}; benchmarks/run.py collects them.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import yaml
from harness import compare, result

STDLIB_EXCLUDE = ["*/site-packages/*", "*/dist-packages/*", "*/test/*", "*/tests/*", "*/idle_test/*", "*/__pycache__/*"]
# The step time of specs/tiny.yaml is measured elsewhere; without it we time a plain torch
# model of the same shape (fp32, which on CPU is at least as fast as the spec's bf16).
TINY = {"num_layers": 4, "hidden_size": 256, "heads": 4, "ffn": 704, "vocab": 4096, "seq": 256, "micro": 8, "global": 16}


def _stdlib_pattern(quick: bool) -> str:
    stdlib = sysconfig.get_paths()["stdlib"]
    # quick: the asyncio, email, json... subpackages only (about a tenth of the 12 MB).
    return f"{stdlib}/{'[a-j]*/**' if quick else '**'}/*.py"


def _spec(root: Path, *, tokenizer: dict, vocab: int, seq: int, workers: int, pattern: str):
    from llmforge.spec.validate import load_and_validate

    doc = {
        "name": "bench",
        "tokenizer": tokenizer,
        "data": {"sources": {"stdlib": {"name": "text", "paths": [pattern], "exclude": STDLIB_EXCLUDE}},
                 "split": {"by": "document", "val_fraction": 0.02}, "shard_size_mb": 4, "num_workers": workers},
        "model": {"name": "gpt", "num_layers": 2, "hidden_size": 64, "num_attention_heads": 2, "vocab_size": vocab, "seq_length": seq},
        "stages": [{"name": "prepare", "type": "prepare"}],
    }
    path = root / f"spec-{workers}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return load_and_validate(str(path))[0]


_HF_BASELINE = """
import json, sys, time
from tokenizers import Tokenizer
tok = Tokenizer.from_file(sys.argv[1])
texts = [open(p, encoding="utf-8").read() for p in json.loads(sys.argv[2])]
texts = [t for t in texts if t and not t.isspace()]
start = time.perf_counter()
getattr(tok, sys.argv[3])(texts, add_special_tokens=False)
print(time.perf_counter() - start)
"""


def _hf_seconds(tokenizer_json: Path, files: list[str], threads: int, method: str = "encode_batch") -> float:
    """Seconds of HF tokenizers' own batch encoding of the files (already in memory), in a fresh process with `threads` threads."""
    env = {**os.environ, "RAYON_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "true" if threads > 1 else "false"}
    out = subprocess.run([sys.executable, "-c", _HF_BASELINE, str(tokenizer_json), json.dumps(files), method], env=env,
                         capture_output=True, text=True, check=True).stdout
    return float(out)


def prepare_throughput(quick: bool) -> dict:
    """MB/s of raw text through prepare (read, tokenize, pack, shard, manifest) vs HF `encode_batch` of the same text.

    The BPE (vocab 8192, trained on the same stdlib source) is trained once beforehand and
    reused by both sides, so the figure compares tokenizing pipelines, not training. Runs
    alternate with the baseline (harness.compare) so machine load hits both alike.
    """
    from llmforge.data.manifest import read_manifest
    from llmforge.data.prepare import run_prepare

    root = Path(tempfile.mkdtemp(prefix="llmforge-prep-bench-"))
    try:
        pattern = _stdlib_pattern(quick)
        tokenizer = {"name": "bpe", "vocab_size": 8192}
        first = _spec(root, tokenizer=tokenizer, vocab=8192, seq=256, workers=2, pattern=pattern)
        start = time.perf_counter()
        run_prepare(first, root / "run", first.stages[0], log=lambda m: None)  # trains and saves the tokenizer
        train_s = time.perf_counter() - start
        manifest = read_manifest(root / "run" / "data")
        files = [row[0] for row in manifest["sources"]["stdlib"]["files"]]
        megabytes = manifest["sources"]["stdlib"]["fingerprint"]["bytes"] / 1e6
        tokenizer_json = root / "run" / "tokenizer" / "tokenizer.json"
        comparisons, fast = {}, {}
        for workers in (1, 2):
            spec = _spec(root, tokenizer=tokenizer, vocab=8192, seq=256, workers=workers, pattern=pattern)

            def ours(spec=spec) -> float:
                shutil.rmtree(root / "run" / "data")
                start = time.perf_counter()
                run_prepare(spec, root / "run", spec.stages[0], log=lambda m: None)
                return megabytes / (time.perf_counter() - start)

            def theirs(workers=workers) -> float:
                return megabytes / _hf_seconds(tokenizer_json, files, threads=workers)

            comparisons[workers] = compare(theirs, ours, repeats=1 if quick else 3)
            fast[workers] = megabytes / _hf_seconds(tokenizer_json, files, threads=workers, method="encode_batch_fast")
        figure = min(c.ratio for c in comparisons.values())
        return result("prepare_throughput", round(figure, 3), 0.8, figure >= 0.8, unit="x", details={
            "text_mb": round(megabytes, 2),
            "bpe_train_plus_first_prepare_s": round(train_s, 2),
            "ratio_1_thread": round(comparisons[1].ratio, 3),
            "ratio_2_cores": round(comparisons[2].ratio, 3),
            "prepare_mb_s": {f"{w}_workers": round(statistics.median(c.subject), 2) for w, c in comparisons.items()},
            "hf_encode_batch_mb_s": {f"{w}_threads": round(statistics.median(c.baseline), 2) for w, c in comparisons.items()},
            "hf_encode_batch_fast_mb_s": {f"{w}_threads": round(v, 2) for w, v in fast.items()},
            "pair_ratios": {w: c.details()["ratios"] for w, c in comparisons.items()},
            "note": "figure = the lower of the two ratios; prepare runs encode_batch_fast (no offsets) in 1 or 2 "
                    "single-threaded worker processes while the main process reads, packs and writes shards",
        })
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _tiny_step_seconds(steps: int = 3) -> float:
    """Seconds per optimizer step of a plain torch GPT of specs/tiny.yaml's shape (2 micro batches of 8 × 256)."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    t = TINY

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            h = t["hidden_size"]
            self.norm1, self.norm2 = nn.RMSNorm(h), nn.RMSNorm(h)
            self.qkv, self.proj = nn.Linear(h, 3 * h, bias=False), nn.Linear(h, h, bias=False)
            self.gate_up, self.down = nn.Linear(h, 2 * t["ffn"], bias=False), nn.Linear(t["ffn"], h, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, s, h = x.shape
            q, k, v = self.qkv(self.norm1(x)).view(b, s, 3, t["heads"], h // t["heads"]).transpose(1, 3).unbind(2)
            x = x + self.proj(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, s, h))
            gate, up = self.gate_up(self.norm2(x)).chunk(2, dim=-1)
            return x + self.down(F.silu(gate) * up)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(t["vocab"], t["hidden_size"]), *[Block() for _ in range(t["num_layers"])],
                          nn.RMSNorm(t["hidden_size"]), nn.Linear(t["hidden_size"], t["vocab"], bias=False))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = torch.randint(0, t["vocab"], (t["micro"], t["seq"] + 1))

    def step() -> None:
        for _ in range(t["global"] // t["micro"]):
            logits = model(batch[:, :-1])
            F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up: allocations, thread pools
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def loader_throughput(quick: bool, step_time_s: float | None = None) -> dict:
    """Tokens/s the loader delivers vs tokens/s one training step of specs/tiny.yaml consumes.

    Args:
        step_time_s: the tiny spec's measured step time; None times a plain torch model of its shape.
    """
    from llmforge.data.loader import TokenLoader
    from llmforge.data.prepare import run_prepare

    t = TINY
    root = Path(tempfile.mkdtemp(prefix="llmforge-loader-bench-"))
    try:
        # Byte tokens keep preparation quick; the loader's work does not depend on the vocabulary.
        spec = _spec(root, tokenizer={"name": "byte"}, vocab=t["vocab"], seq=t["seq"], workers=2, pattern=_stdlib_pattern(quick))
        run_prepare(spec, root / "run", spec.stages[0], log=lambda m: None)
        steps = 100 if quick else 1000
        rates = {}
        for workers in (0, 2):
            loader = TokenLoader(root / "run" / "data", "train", global_batch_size=t["global"], micro_batch_size=t["micro"],
                                 seed=1234, num_workers=workers, vocab_size=t["vocab"])
            loader.next_global_batch()  # opens and checksums the first shards, starts workers
            start = time.perf_counter()
            for _ in range(steps):
                loader.next_global_batch()
            rates[workers] = steps * t["global"] * t["seq"] / (time.perf_counter() - start)
            loader.close()
        measured = step_time_s is None
        step_s = _tiny_step_seconds() if measured else step_time_s
        consumed = t["global"] * t["seq"] / step_s
        figure = min(rates.values()) / consumed
        return result("loader_throughput", round(figure, 1), 20.0, figure >= 20.0, unit="x", details={
            "loader_tokens_per_s": {f"{w}_workers": round(r) for w, r in rates.items()},
            "tiny_step_s": round(step_s, 4),
            "step_time": "timed plain-torch model of the tiny shape, fp32" if measured else "given",
            "tiny_tokens_per_s_consumed": round(consumed),
            "note": "figure = the slower loader configuration (0 or 2 workers) over the tokens one tiny step consumes per second",
        })
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    quick = "--quick" in sys.argv
    for bench in (prepare_throughput, loader_throughput):
        print(json.dumps(bench(quick), indent=1))
