"""Data pipeline benchmarks: prepare and loader throughput, as ratios against baselines measured in the same run.

    python benchmarks/data_bench.py [--quick] [--only prepare_processes] [--gb 1.0]

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


PROCESSES_GOAL = 0.8  # prepare on 2 processes × 1 worker, against HF encode_batch_fast with 2 threads
RSS_LIMIT_GB = 1.5  # peak resident memory of any one process of prepare (its workers included)


def _generate_lines(path: Path, total_bytes: int, seed: int = 0) -> int:
    """One text file of about `total_bytes`: lines of 5-120 pseudo-words of 1-4 syllables, drawn by a Zipf law from 30000
    (text-like for BPE: common words, learnable pieces, a long tail). Written a few MB at a time; returns the bytes."""
    import numpy as np

    rng = np.random.default_rng(seed)
    syllables = np.array([c + v for c in "bdfghklmnprstvwz" for v in ("a", "e", "i", "o", "u", "ai", "ou", "er")])
    vocab = np.array(["".join(rng.choice(syllables, size=n)) for n in rng.integers(1, 5, 30000)], dtype=object)
    written = 0
    with open(path, "w") as f:
        while written < total_bytes:
            words = vocab[np.minimum(rng.zipf(1.3, 1_000_000), 30000) - 1]
            cuts = np.cumsum(rng.integers(5, 120, 20000))
            cuts = np.concatenate([[0], cuts[cuts < words.size]])
            block = "\n".join(" ".join(words[a:b]) for a, b in zip(cuts[:-1], cuts[1:])) + "\n"
            f.write(block)
            written += len(block)
    return written


_HF_LINES = """
import json, resource, sys, time
from tokenizers import Tokenizer
tok = Tokenizer.from_file(sys.argv[1])
seconds, batch, size = 0.0, [], 0
def run(batch):
    start = time.perf_counter()
    tok.encode_batch_fast(batch, add_special_tokens=False)
    return time.perf_counter() - start
with open(sys.argv[2], encoding="utf-8") as f:
    for line in f:
        if line.strip():
            batch.append(line.rstrip("\\n"))
            size += len(line)
        if size >= 64 << 20:
            seconds += run(batch)
            batch, size = [], 0
if batch:
    seconds += run(batch)
print(json.dumps({"seconds": seconds, "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def _prepare_process(rank: int, n: int, spec, run_dir: Path, barrier, out) -> None:
    import resource

    from llmforge.data.prepare import Processes, run_prepare

    try:
        run_prepare(spec, run_dir, spec.stages[0], log=lambda m: None, processes=Processes(rank, n, n, barrier.wait))
        out.put((rank, None, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))
    except BaseException as e:  # reported by the parent, which fails the benchmark
        out.put((rank, repr(e), 0, 0))


def _prepare_on(processes: int, spec, run_dir: Path) -> tuple[float, list[dict]]:
    """Seconds of prepare on `processes` forked processes (meeting at a barrier, as the stage runner's do), and each one's
    peak RSS in GB: its own and its largest worker's."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    barrier, out = ctx.Barrier(processes), ctx.Queue()
    start = time.perf_counter()
    procs = [ctx.Process(target=_prepare_process, args=(r, processes, spec, run_dir, barrier, out)) for r in range(processes)]
    for p in procs:
        p.start()
    reports = sorted(out.get() for _ in procs)
    for p in procs:
        p.join()
    seconds = time.perf_counter() - start
    for rank, error, _, _ in reports:
        if error:
            raise RuntimeError(f"prepare failed on process {rank}: {error}")
    return seconds, [{"rank": r, "main_gb": round(own / 2**20, 3), "worker_gb": round(child / 2**20, 3)} for r, _, own, child in reports]


def prepare_processes(quick: bool, gigabytes: float | None = None) -> dict:
    """prepare on 2 processes × 1 worker, MB/s over HF `encode_batch_fast` with 2 threads on the same text; and peak RSS.

    The corpus is one generated file of `gigabytes` (default 0.1; quick 0.02) of lines, a document
    each: the huge-single-file case, which prepare cuts into byte ranges for the processes. Both
    sides use the same BPE (vocab 8192, trained beforehand on the first MBs). The baseline gets
    the lines already read, 64 MiB per call; prepare's time is the whole stage (fingerprint, read,
    tokenize, merge, pack, write shards and manifest), from fork to the last process's exit.
    """
    size = gigabytes or (0.02 if quick else 0.1)
    root = Path(tempfile.mkdtemp(prefix="llmforge-procs-bench-"))
    try:
        from llmforge.data.prepare import run_prepare
        from llmforge.spec.validate import load_and_validate

        corpus = root / "corpus.txt"
        text_bytes = _generate_lines(corpus, int(size * 1e9))
        sample = root / "sample.txt"
        with open(corpus, "rb") as f:
            sample.write_bytes(f.read(16 << 20).rsplit(b"\n", 1)[0] + b"\n")

        def spec(name: str, path: Path, tokenizer: dict):
            doc = {"name": "bench", "tokenizer": tokenizer,
                   "data": {"sources": {"lines": {"name": "text", "document": "line", "paths": [str(path)]}},
                            "split": {"by": "document", "val_fraction": 0.01}, "shard_size_mb": 64, "num_workers": 1},
                   "model": {"name": "gpt", "num_layers": 2, "hidden_size": 64, "num_attention_heads": 2, "vocab_size": 8192,
                             "seq_length": 1024},
                   "stages": [{"name": "prepare", "type": "prepare"}]}
            (root / f"{name}.yaml").write_text(yaml.safe_dump(doc))
            return load_and_validate(str(root / f"{name}.yaml"))[0]

        trained = spec("train", sample, {"name": "bpe", "vocab_size": 8192})
        run_prepare(trained, root / "tok", trained.stages[0], log=lambda m: None)
        tokenizer_json = root / "tok" / "tokenizer" / "tokenizer.json"
        bench = spec("bench", corpus, {"name": "pretrained", "path": str(tokenizer_json)})
        megabytes = text_bytes / 1e6
        rss: list[dict] = []

        def ours() -> float:
            shutil.rmtree(root / "run", ignore_errors=True)
            seconds, reports = _prepare_on(2, bench, root / "run")
            rss.extend(reports)
            return megabytes / seconds

        hf_rss: list[float] = []

        def theirs() -> float:
            env = {**os.environ, "RAYON_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "true"}
            out = json.loads(subprocess.run([sys.executable, "-c", _HF_LINES, str(tokenizer_json), str(corpus)], env=env,
                                            capture_output=True, text=True, check=True).stdout)
            hf_rss.append(out["maxrss_kb"] / 2**20)
            return megabytes / out["seconds"]

        comparison = compare(theirs, ours, repeats=1 if quick or size >= 0.5 else 2)
        peak = max(max(r["main_gb"], r["worker_gb"]) for r in rss)
        figure = comparison.ratio
        return result("prepare_processes", round(figure, 3), PROCESSES_GOAL, figure >= PROCESSES_GOAL and peak < RSS_LIMIT_GB, unit="x",
                      details={
                          "text_gb": round(text_bytes / 1e9, 3),
                          "prepare_2x1_mb_s": round(statistics.median(comparison.subject), 2),
                          "hf_encode_batch_fast_2_threads_mb_s": round(statistics.median(comparison.baseline), 2),
                          "pair_ratios": comparison.details()["ratios"],
                          "peak_rss_gb_per_process": peak, "rss_limit_gb": RSS_LIMIT_GB, "rss": rss[-2:],
                          "hf_baseline_peak_rss_gb": round(max(hf_rss), 3),
                          "note": "figure = prepare MB/s on 2 processes × 1 worker (forked, meeting at a barrier; one generated "
                                  "file of lines, cut into byte ranges) / HF encode_batch_fast MB/s with RAYON_NUM_THREADS=2 on the "
                                  "same lines in memory; met also needs every process's (and worker's) peak RSS under the limit",
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
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--gb", type=float, help="the size of prepare_processes' generated corpus in GB (default 0.1)")
    parser.add_argument("--only", help="run just this benchmark (e.g. prepare_processes)")
    args = parser.parse_args()
    benches = {"prepare_throughput": prepare_throughput, "prepare_processes": lambda quick: prepare_processes(quick, args.gb),
               "prepare_stream": prepare_stream, "loader_throughput": loader_throughput}
    for name, bench in benches.items():
        if args.only in (None, name):
            print(json.dumps(bench(args.quick), indent=1))
