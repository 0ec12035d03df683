"""prepare on several processes (and workers) writes the same bytes as one process reading every file whole.

The processes are forked from the test and meet at a multiprocessing barrier, as the stage
runner's processes meet at torch.distributed's; they share the run dir as nodes share a
filesystem. Pieces are made small here, so every big file is cut into many byte ranges (at
different places for each layout) and each layout divides them differently.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import random
import traceback
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from llmforge.data import prepare as prep
from llmforge.data.prepare import Processes, run_prepare
from llmforge.spec.errors import UserError

from .conftest import WORDS, make_spec, write_corpus

pytestmark = pytest.mark.slow
WHOLE = 1 << 40  # a piece size no file reaches: the one-process reference reads every file whole, as the sources do


def _words(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def _corpus(root: Path) -> dict:
    """Every unit kind: small files, big line / paragraph / JSONL files (bad input included), WebDataset shards, Parquet."""
    rng = random.Random(7)
    write_corpus(root / "files", n_docs=12)
    (root / "lines.txt").write_text("".join(_words(rng, 0, 30) + ("\r\n" if i % 7 == 0 else "\n") for i in range(6000)))
    bad = "".join(_words(rng, 1, 20) + "\n" for i in range(3000)).encode()
    cut = len(bad) * 3 // 4
    (root / "lines-bad.txt").write_bytes(bad[:cut] + b"\xff" + bad[cut:])  # one bad byte late in the file: the whole file is skipped
    breaks = ["\n\n", "\n \n", "\n\t\r\n\n  ", "\n\n\u00a0", "\n\u00a0\n\n", "\n", "\n\n\n\n"]
    (root / "paras.txt").write_text("".join(_words(rng, 1, 60) + rng.choice(breaks) for _ in range(4000)))
    records = [json.dumps({"text": _words(rng, 1, 40)}) for _ in range(2500)]
    lines = [records[i] if i % 5 else records[i // 3] for i in range(len(records))]  # duplicates, near and far
    lines[1700] = "{not json"
    (root / "recs.jsonl").write_text("\n".join(lines) + "\n")
    (root / "web").mkdir()
    for s in range(3):
        with wds.TarWriter(str(root / "web" / f"shard-{s:06d}.tar")) as sink:
            for i in range(40):
                sink.write({"__key__": f"{s}-{i}", "txt": _words(rng, 5, 50)})
    pq.write_table(pa.Table.from_pylist([{"text": _words(rng, 3, 30)} for _ in range(300)]), root / "t.parquet", row_group_size=50)
    return {
        "files": {"name": "text", "paths": [str(root / "files" / "**" / "*.txt")]},
        "lines": {"name": "text", "document": "line", "paths": [str(root / "lines.txt"), str(root / "lines-bad.txt")]},
        "paras": {"name": "text", "document": "paragraph", "paths": [str(root / "paras.txt")]},
        "recs": {"name": "jsonl", "paths": [str(root / "recs.jsonl")], "filters": {"dedup": True}},
        "web": {"name": "webdataset", "paths": [str(root / "web" / "shard-{000000..000002}.tar")]},
        "pq": {"name": "parquet", "paths": [str(root / "t.parquet")]},
    }


def _run(rank: int, n: int, spec, run_dir: Path, barrier, errors) -> None:
    try:
        run_prepare(spec, run_dir, spec.stages[0], log=lambda m: None, processes=Processes(rank, n, n, barrier.wait))
    except UserError as e:
        errors.put((rank, str(e)))
    except BaseException:
        errors.put((rank, traceback.format_exc()))


def prepare_with(spec, run_dir: Path, processes: int, piece_bytes: int | None = None) -> list[str]:
    """Prepare in `processes` forked processes with pieces of `piece_bytes` (default: 1/16 of a worker's share); their errors."""
    saved = prep._piece_bytes
    prep._piece_bytes = (lambda total, slots: piece_bytes) if piece_bytes else (lambda total, slots: max(total // (16 * slots), 4096))
    ctx = mp.get_context("fork")
    try:
        barrier, errors = ctx.Barrier(processes), ctx.Queue()
        procs = [ctx.Process(target=_run, args=(r, processes, spec, run_dir, barrier, errors)) for r in range(processes)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(300)
            assert p.exitcode == 0
    finally:
        prep._piece_bytes = saved
    out = []
    while not errors.empty():
        out.append(errors.get())
    return [message for _, message in sorted(out)]


def files_of(run_dir: Path) -> dict[str, bytes]:
    """Every file under run_dir/data, by relative path: the shards and the manifest, nothing left over."""
    data = run_dir / "data"
    return {str(p.relative_to(data)): p.read_bytes() for p in sorted(data.rglob("*")) if p.is_file()}


LAYOUTS = {"1 process, pieces": (1, 1), "2 processes": (2, 1), "2 processes x 2 workers": (2, 2)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """(spec name → layout → data files), plus the pieces seen: a windows spec with dedup and skipped bad input, and a
    documents spec with a mixture and a contiguous split, each prepared by every layout and by the whole-file reference."""
    root = tmp_path_factory.mktemp("processes")
    sources = _corpus(root / "corpus")
    variants = {
        "windows": dict(packing="windows", seq_length=64,
                        data={"on_error": "skip", "split": {"by": "document", "val_fraction": 0.1}, "shard_size_mb": 0.25}),
        "documents": dict(packing="documents", seq_length=48,
                          data={"on_error": "skip", "split": {"by": "contiguous", "val_fraction": 0.05}, "shard_size_mb": 0.25,
                                "mix": {"files": 1, "lines": 2, "paras": 1, "recs": 3, "web": 1, "pq": 0.5}}),
    }
    out: dict = {"pieces": {}}
    for name, options in variants.items():
        out[name] = {}
        tokenizer = {"name": "bpe", "vocab_size": 400}
        reference = make_spec(root, sources=sources, tokenizer=tokenizer, **options)
        assert prepare_with(reference, root / name / "reference", 1, piece_bytes=WHOLE) == []
        out[name]["reference"] = files_of(root / name / "reference")
        for layout, (processes, workers) in LAYOUTS.items():
            spec = make_spec(root, sources=sources, tokenizer=tokenizer, overrides=[f"data.num_workers={workers}"], **options)
            run_dir = root / name / layout.replace(" ", "-")
            assert prepare_with(spec, run_dir, processes) == []
            out[name][layout] = files_of(run_dir)
    out["root"], out["sources"] = root, sources
    return out


@pytest.mark.parametrize("variant", ["windows", "documents"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_layout_writes_the_bytes_of_one_process(runs, variant, layout):
    reference, got = runs[variant]["reference"], runs[variant][layout]
    assert sorted(got) == sorted(reference)  # the same shards, the manifest, and no work files left
    assert [p for p in reference if p.startswith(".")] == []
    for path in reference:
        assert got[path] == reference[path], f"{variant}, {layout}: {path} differs"


def test_the_reference_saw_the_bad_input_and_duplicates(runs):
    """What the identity covers: a file dropped for one bad byte, a bad JSON line skipped, duplicates across ranges."""
    manifest = json.loads(runs["windows"]["reference"]["manifest.json"])
    counts = {n: s["counts"] for n, s in manifest["sources"].items()}
    assert counts["lines"]["skipped_errors"] == 1 and counts["recs"]["skipped_errors"] == 1
    texts = []
    for line in (runs["root"] / "corpus" / "recs.jsonl").read_text().splitlines():
        try:
            texts.append(json.loads(line)["text"])
        except json.JSONDecodeError:
            pass
    assert counts["recs"]["duplicates"] == len(texts) - len(set(texts)) > 300
    assert counts["lines"]["kept"] == sum(1 for line in (runs["root"] / "corpus" / "lines.txt").read_text().split("\n") if line.strip())


def test_big_files_were_cut_into_ranges(runs):
    """The layouts really divided the big files: many byte ranges of each, not one unit per file."""
    spec = make_spec(runs["root"], sources=runs["sources"], tokenizer={"name": "byte"})
    from llmforge.data import units
    from llmforge.data.errors import ErrorPolicy
    from llmforge.data.sources import SourceContext

    for name in ("lines", "paras", "recs"):
        found = units.plan(name, spec.data.sources[name], SourceContext(name, ErrorPolicy("skip", None)), 16 << 10)
        assert sum(u.kind == "range" for u in found) >= 10, name
        for a, b in zip(found, found[1:]):
            if a.path == b.path:
                assert a.end == b.start  # contiguous: nothing read twice, nothing left out


def test_an_error_is_the_one_a_single_process_raises(tmp_path):
    """With on_error: raise, every process stops with the first bad input in document order, named as one process names it."""
    sources = _corpus(tmp_path / "corpus")
    spec = make_spec(tmp_path, sources=sources, tokenizer={"name": "byte"}, seq_length=64)
    one = prepare_with(spec, tmp_path / "one", 1, piece_bytes=WHOLE)
    two = prepare_with(spec, tmp_path / "two", 2)
    assert len(one) == 1 and "lines-bad.txt:" in one[0] and "not valid UTF-8" in one[0]
    assert two == one * 2
    assert not (tmp_path / "two" / "data" / ".work").exists() and not (tmp_path / "two" / "data" / "manifest.json").exists()


def test_llmforge_run_on_two_processes_writes_the_bytes_of_one(runs, tmp_path):
    """The stage runner's way: `llmforge run --nproc-per-node 2` (torchrun, gloo barriers) against one process in this one."""
    import os
    import subprocess
    import sys

    import yaml

    sources = {k: v for k, v in runs["sources"].items() if k in ("lines", "paras", "recs")}
    reference = make_spec(tmp_path, sources=sources, tokenizer={"name": "bpe", "vocab_size": 400}, seq_length=64,
                          data={"on_error": "skip", "shard_size_mb": 0.25})
    assert prepare_with(reference, tmp_path / "one", 1, piece_bytes=WHOLE) == []
    spec_file = tmp_path / "spec.yaml"  # make_spec's file: the same spec, for the CLI
    doc = yaml.safe_load(spec_file.read_text())
    assert doc["data"]["sources"] == sources
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    done = subprocess.run([sys.executable, "-m", "llmforge.cli", "run", str(spec_file), "--run-dir", str(tmp_path / "two"),
                           "--nproc-per-node", "2"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "2 processes × 1 worker" in (tmp_path / "two" / "run.log").read_text()
    assert files_of(tmp_path / "two") == files_of(tmp_path / "one")
