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
    """MB/s of raw text through prepare (read, tokenize, pack, shard, manifest) vs HF `encode_batch_fast` of the same text.

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
        comparisons, slow = {}, {}
        for workers in (1, 2):
            spec = _spec(root, tokenizer=tokenizer, vocab=8192, seq=256, workers=workers, pattern=pattern)

            def ours(spec=spec) -> float:
                shutil.rmtree(root / "run" / "data")
                start = time.perf_counter()
                run_prepare(spec, root / "run", spec.stages[0], log=lambda m: None)
                return megabytes / (time.perf_counter() - start)

            def theirs(workers=workers) -> float:
                # The faster of HF's batch calls, the one prepare itself uses: the baseline must not flatter us.
                return megabytes / _hf_seconds(tokenizer_json, files, threads=workers, method="encode_batch_fast")

            comparisons[workers] = compare(theirs, ours, repeats=1 if quick else 3)
            slow[workers] = megabytes / _hf_seconds(tokenizer_json, files, threads=workers)
        figure = min(c.ratio for c in comparisons.values())
        return result("prepare_throughput", round(figure, 3), 0.8, figure >= 0.8, unit="x", details={
            "text_mb": round(megabytes, 2),
            "bpe_train_plus_first_prepare_s": round(train_s, 2),
            "ratio_1_thread": round(comparisons[1].ratio, 3),
            "ratio_2_cores": round(comparisons[2].ratio, 3),
            "prepare_mb_s": {f"{w}_workers": round(statistics.median(c.subject), 2) for w, c in comparisons.items()},
            "hf_encode_batch_fast_mb_s": {f"{w}_threads": round(statistics.median(c.baseline), 2) for w, c in comparisons.items()},
            "hf_encode_batch_mb_s": {f"{w}_threads": round(v, 2) for w, v in slow.items()},
            "pair_ratios": {w: c.details()["ratios"] for w, c in comparisons.items()},
            "note": "figure = the lower of the two ratios; prepare runs encode_batch_fast (no offsets) in 1 or 2 "
                    "single-threaded worker processes while the main process reads, packs and writes shards",
        })
    finally:
        shutil.rmtree(root, ignore_errors=True)


STREAM_GOAL = 0.8  # prepare from shards served over HTTP, against the same shards read from local files


def _write_text_shards(root: Path, shards: int, samples: int) -> float:
    """WebDataset shards of ~2 KB text samples written by webdataset's TarWriter; returns the MB of text."""
    import random

    import webdataset as wds

    rng = random.Random(0)
    words = "the quick brown fox jumps over a lazy dog while 12 cats and 345 owls watch from the old oak tree".split()
    total = 0
    root.mkdir(parents=True)
    for s in range(shards):
        with wds.TarWriter(str(root / f"shard-{s:06d}.tar")) as sink:
            for i in range(samples):
                text = " ".join(rng.choice(words) for _ in range(400))
                total += len(text)
                sink.write({"__key__": f"{s:06d}-{i:06d}", "txt": text})
    return total / 1e6


def _webdataset_spec(root: Path, name: str, paths: list[str]):
    from llmforge.spec.validate import load_and_validate

    doc = {
        "name": "bench", "tokenizer": {"name": "byte"},
        "data": {"sources": {"web": {"name": "webdataset", "paths": paths}}, "split": {"by": "document", "val_fraction": 0.02},
                 "shard_size_mb": 4, "num_workers": 2},
        "model": {"name": "gpt", "num_layers": 2, "hidden_size": 64, "num_attention_heads": 2, "vocab_size": 512, "seq_length": 256},
        "stages": [{"name": "prepare", "type": "prepare"}],
    }
    path = root / f"spec-{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return load_and_validate(str(path))[0]


def prepare_stream(quick: bool) -> dict:
    """MB/s of prepare on WebDataset shards streamed from a local HTTP server, over the same shards read from local files.

    The server is `python -m http.server` in its own process on 127.0.0.1, so it competes with
    prepare for the cores as a remote store would not; webdataset fetches each URL with curl.
    The byte tokenizer keeps tokenizing cheap, so the cost of streaming shows rather than hides.
    """
    import socket

    from llmforge.data.prepare import run_prepare

    root = Path(tempfile.mkdtemp(prefix="llmforge-stream-bench-"))
    shards = 8 if quick else 16
    server = None
    try:
        megabytes = _write_text_shards(root / "shards", shards, 500 if quick else 1000)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(root / "shards")],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        braces = f"shard-{{000000..{shards - 1:06d}}}.tar"
        for _ in range(100):  # until the server listens
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
                break
            except OSError:
                time.sleep(0.05)
        specs = {"local": _webdataset_spec(root, "local", [str(root / "shards" / braces)]),
                 "http": _webdataset_spec(root, "http", [f"http://127.0.0.1:{port}/{braces}"])}

        def measure(kind: str) -> float:
            shutil.rmtree(root / kind, ignore_errors=True)
            start = time.perf_counter()
            run_prepare(specs[kind], root / kind, specs[kind].stages[0], log=lambda m: None)
            return megabytes / (time.perf_counter() - start)

        measure("http")  # warm-up: page cache, curl and the server's first connections
        comparison = compare(lambda: measure("local"), lambda: measure("http"), repeats=2 if quick else 5)
        local = _shard_hashes(root / "local")
        same = local == _shard_hashes(root / "http")
        figure = comparison.ratio
        return result("prepare_stream", round(figure, 3), STREAM_GOAL, figure >= STREAM_GOAL and same, unit="x", details={
            "text_mb": round(megabytes, 2), "shards": shards,
            "local_mb_s": round(statistics.median(comparison.baseline), 2),
            "http_mb_s": round(statistics.median(comparison.subject), 2),
            "pair_ratios": comparison.details()["ratios"],
            "same_shards": same,
            "note": "figure = prepare MB/s from http://127.0.0.1 (python -m http.server in its own process, fetched by webdataset "
                    "through curl) / from the same shards as local files; byte tokenizer, 2 workers",
        })
    finally:
        if server is not None:
            server.terminate()
            server.wait()
        shutil.rmtree(root, ignore_errors=True)


def _shard_hashes(run_dir: Path) -> list[str]:
    """The sha256 of every shard prepare wrote: equal lists mean both runs produced the same bytes."""
    from llmforge.data.manifest import read_manifest

    manifest = read_manifest(run_dir / "data")
    return [s["sha256"] for split in manifest["splits"].values() for s in split["shards"]]


LOADER_GOAL = 0.01  # the loader may add at most 1% to a step when nothing overlaps it (0 workers)


def _ten_m_rank_step_seconds(steps: int) -> float:
    """Seconds per optimizer step of llmforge's own step on one DP=2 rank's share of the 10M shape's batch (fp32)."""
    import workloads

    work = workloads.TEN_M
    share = work.shrunk(work.micro_batch_size, work.num_micro_batches // 2)  # DP=2: each rank trains half the global batch
    built = workloads.build_llmforge(share, precisions=("fp32",))
    data = workloads.batches(share)
    built["step"]["fp32"](data)  # warm-up: allocations, thread pools
    start = time.perf_counter()
    for _ in range(steps):
        built["step"]["fp32"](data)
    return (time.perf_counter() - start) / steps


def loader_throughput(quick: bool) -> dict:
    """Whether the loader keeps up: its seconds per step on one DP=2 rank with 0 workers, over that rank's step time.

    The 10M shape (GPT-2 switches, vocab 16384, 8 × 256 tokens a step) at DP=2: each rank reads
    its 4 samples per step in the training process itself (0 workers, nothing overlaps), so
    this share of a step is what data loading costs training. It fails above LOADER_GOAL.
    """
    import workloads

    from llmforge.data.loader import TokenLoader
    from llmforge.data.prepare import run_prepare

    work = workloads.TEN_M
    vocab, seq = work.model["vocab_size"], work.seq_length
    global_batch = work.micro_batch_size * work.num_micro_batches
    root = Path(tempfile.mkdtemp(prefix="llmforge-loader-bench-"))
    try:
        # Byte tokens keep preparation quick; the loader's work does not depend on the vocabulary.
        spec = _spec(root, tokenizer={"name": "byte"}, vocab=vocab, seq=seq, workers=2, pattern=_stdlib_pattern(quick))
        run_prepare(spec, root / "run", spec.stages[0], log=lambda m: None)
        steps = 100 if quick else 1000
        loader = TokenLoader(root / "run" / "data", "train", global_batch_size=global_batch, micro_batch_size=work.micro_batch_size,
                             dp_rank=0, dp_size=2, seed=1234, num_workers=0, vocab_size=vocab)
        loader.next_global_batch()  # opens and checksums the first shards
        start = time.perf_counter()
        for _ in range(steps):
            loader.next_global_batch()
        load_s = (time.perf_counter() - start) / steps
        loader.close()
        step_s = _ten_m_rank_step_seconds(2 if quick else 5)
        figure = load_s / step_s
        return result("loader_throughput", round(figure, 5), f"<= {LOADER_GOAL}", figure <= LOADER_GOAL, unit="x", details={
            "loader_ms_per_step": round(load_s * 1e3, 4),
            "step_ms_per_rank": round(step_s * 1e3, 1),
            "loader_tokens_per_s": round(global_batch // 2 * seq / load_s),
            "workload": "10M shape (GPT-2 switches), DP=2 rank 0: 4 × 256 tokens a step, 0 loader workers, fp32 step",
            "note": "figure = loader seconds per step / llmforge step seconds for the same rank's share; lower is better",
        })
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    quick = "--quick" in sys.argv
    for bench in (prepare_throughput, prepare_stream, loader_throughput):
        print(json.dumps(bench(quick), indent=1))
