"""The prepare stage: sources → tokenizer → token streams → split, mix, pack → shards + manifest.

Re-runs are cheap and safe: the inputs (source fingerprints, options, tokenizer, seed,
seq_length, packing) are hashed into the manifest; identical inputs with intact shards are
reused, changed ones are rebuilt (or refused, `data.on_change: refuse`), never mixed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from llmforge.atomic import sha256_file, write_json
from llmforge.data import manifest as mf
from llmforge.data import packing, units
from llmforge.data.errors import ErrorPolicy
from llmforge.data.files import fingerprint_files, resolve_files
from llmforge.data.filters import FilterCounts, filtered
from llmforge.data.shards import ShardWriter
from llmforge.data.sources import Document, SourceContext
from llmforge.data.tokenize import Merged, first_error, merge, tokenize_pieces
from llmforge.data.tokenizers import Tokenizer, load_tokenizer
from llmforge.spec.errors import UserError

DATA_FORMAT = 2  # bump when the shard layout changes, so old shards are rebuilt (2: BOS starts each document)
Log = Callable[[str], None]


def _digest(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _fingerprint(name: str, options, on_error: str) -> dict:
    """What a re-run compares: files by content hash, URLs by what a HEAD request tells; just the options of any other source."""
    # Silent here: the source reports (or raises) the same problems when it is read.
    errors = ErrorPolicy(on_error, log=None)
    where = f"data.sources.{name}.paths"
    if options.name == "webdataset":
        from llmforge.data import wds

        return wds.fingerprint(options, errors, where)
    if options.name == "hf_dataset":
        return fingerprint_files(resolve_files([options.path], [], errors, f"data.sources.{name}.path"))
    if not hasattr(options, "paths"):
        return {"per_file": [], "sha256": None}
    return fingerprint_files(resolve_files(options.paths, getattr(options, "exclude", []), errors, where))


def _path_digest(path: Path) -> str | None:
    if path.is_file():
        return sha256_file(path)
    if path.is_dir():
        return _digest([[p.name, sha256_file(p)] for p in sorted(path.iterdir()) if p.is_file()])
    return None


def _tokenizer_key(spec, sources: dict) -> str:
    """What the tokenizer depends on: its options, plus the data it trains on or the file it loads."""
    tok = spec.tokenizer
    payload: dict = {"options": tok.model_dump(mode="json")}
    if tok.name == "pretrained":
        payload["file"] = _path_digest(Path(tok.path).expanduser())
    elif tok.name != "byte":
        payload["sources"] = sources
    return _digest(payload)


def _documents(spec, registry, tokenizer: Tokenizer | None, policies: dict[str, ErrorPolicy], counts: dict[str, FilterCounts],
               *, text_only: bool = False) -> Iterator[tuple[str, Document]]:
    """(source name, document) of every source in spec order, filtered and counted (what the tokenizer trains on)."""
    for name, options in spec.data.sources.items():
        context = SourceContext(f"data.sources.{name}", policies[name], tokenizer)
        for doc in filtered(units.stream(name, options, context, registry), getattr(options, "filters", None), counts[name]):
            if text_only and not isinstance(doc.content, str):
                continue
            yield name, doc


def _tokenizer(spec, run_dir: Path, key: str, registry, log: Log) -> Tokenizer:
    """The run's tokenizer: reused when built from the same inputs, else built and saved."""
    tok_dir = run_dir / "tokenizer"
    if (tok_dir / "meta.json").is_file():
        try:
            tok = load_tokenizer(tok_dir)
            if tok.built_from == key:
                return tok
            log(f"prepare: the tokenizer's inputs changed; building it again in {tok_dir}")
        except UserError as e:
            log(f"prepare: building the tokenizer again: {e}")
    names = list(spec.data.sources)
    counts = {n: FilterCounts() for n in names}
    policies = {n: ErrorPolicy(spec.data.on_error, log=None) for n in names}
    texts = (doc.content for _, doc in _documents(spec, registry, None, policies, counts, text_only=True))
    start = time.perf_counter()
    tok = registry.build("tokenizer", spec.tokenizer, run_dir=run_dir, texts=texts)
    tok.built_from = key
    tok.save(tok_dir)
    log(f"prepare: built the {spec.tokenizer.name} tokenizer ({tok.vocab_size} tokens) in {time.perf_counter() - start:.1f} s → {tok_dir}")
    return tok


@contextlib.contextmanager
def _progress(total_bytes: int, enabled: bool = True) -> Iterator[Callable[[int], None]]:
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    console = Console(stderr=True)
    columns = (TextColumn("tokenizing"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, disable=not (enabled and console.is_terminal)) as bar:
        task = bar.add_task("tokenize", total=total_bytes)
        yield lambda n: bar.advance(task, n)
        bar.update(task, completed=total_bytes)


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (a vocabulary under 65536), else uint32: half the disk for most models."""
    return np.dtype(np.uint16 if vocab_size < 2**16 else np.uint32)



@dataclass(frozen=True)
class Processes:
    """The processes that prepare together (default: this one alone) and a barrier they all meet at.

    Every process tokenizes a share of the pieces; rank 0 alone decides, trains the tokenizer
    and writes the shards. They talk through files in the run dir (multi-node: a filesystem
    all nodes share), so a long phase on one of them never runs into a collective's timeout.
    """

    rank: int = 0
    world_size: int = 1
    local_world_size: int = 1  # processes on this machine, which share its cores
    barrier: Callable[[], None] = field(default=lambda: None, compare=False)


def _workers(requested: int, local_world_size: int) -> int:
    return requested or max(1, len(os.sched_getaffinity(0)) // local_world_size)


def _piece_bytes(total_bytes: int, slots: int) -> int:
    """About four pieces per worker of the job, for balance; at least 1 MiB (overhead) and at most 64 MiB (memory)."""
    return int(min(max(total_bytes / (4 * slots), 1 << 20), 64 << 20))


class _Sync:
    """Small JSON files that the processes leave for each other in the work dir."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def publish(self, name: str, obj: dict) -> None:
        write_json(self.folder / f"{name}.json", obj)

    def wait(self, name: str) -> dict:
        path, pause = self.folder / f"{name}.json", 0.01
        while not path.exists():
            time.sleep(pause)
            pause = min(pause * 2, 0.5)
        return json.loads(path.read_text())


def _error(e: BaseException) -> dict:
    if isinstance(e, UserError):
        return {"message": e.args[0], "hint": e.hint}
    return {"message": f"{type(e).__name__}: {e}", "hint": None, "bug": True}


def _raise(error: dict, who: str) -> None:
    if error.get("bug"):
        raise RuntimeError(f"prepare failed in {who}: {error['message']}" + (f"\n{error['traceback']}" if error.get("traceback") else ""))
    raise UserError(error["message"], error["hint"])


def run_prepare(spec, run_dir: Path, stage, log: Log = print, processes: Processes = Processes()) -> dict:
    """Train/load the tokenizer into run_dir/tokenizer, write run_dir/data shards + manifest.json.

    Reuses existing shards when the inputs are unchanged and the shards intact. Returns the
    manifest. Called on every process of a job with its `processes`: the shards and manifest
    are byte-identical to those of one process.
    """
    from llmforge.registry.manager import get_registry

    registry = get_registry()
    data_dir = Path(run_dir) / "data"
    work_dir = data_dir / ".work"
    sync = _Sync(work_dir / "sync")
    rank = processes.rank
    if rank == 0:
        shutil.rmtree(work_dir, ignore_errors=True)  # left by a killed run
        sync.folder.mkdir(parents=True)
    processes.barrier()  # nobody reads the work dir before it is fresh
    try:
        if rank == 0:
            try:
                plan = _plan(spec, Path(run_dir), stage, registry, processes, log)
            except BaseException as e:
                sync.publish("plan", {"error": _error(e)})
                raise
            sync.publish("plan", plan["public"])
        else:
            public = sync.wait("plan")
            if "error" in public:
                _raise(public["error"], "rank 0")
            plan = {"public": public}
        if plan["public"]["reuse"]:
            return plan.get("manifest") or mf.read_manifest(data_dir)
        return _tokenize_and_build(spec, stage, registry, data_dir, work_dir, sync, processes, plan, log)
    finally:
        # Every failure was published, so all processes end here together; then the work dir
        # (token files are only scaffolding) can go.
        with contextlib.suppress(Exception):
            processes.barrier()
        if rank == 0:
            shutil.rmtree(work_dir, ignore_errors=True)


def _plan(spec, run_dir: Path, stage, registry, processes: Processes, log: Log) -> dict:
    """Rank 0's part before tokenizing: compare the inputs, build the tokenizer, decide reuse, and cut the work into pieces."""
    data = spec.data
    data_dir = run_dir / "data"
    if not data.sources:
        raise UserError("data.sources is empty: the prepare stage has nothing to tokenize", "add a source, e.g. data.sources.web: {name: text, paths: [corpus/*.txt]}")
    seq_length = getattr(spec.model, "seq_length", None)
    if seq_length is None:
        raise UserError(f"model {spec.model.name!r} has no seq_length, which prepare needs to pack samples", "add model.seq_length")

    fingerprints = {name: _fingerprint(name, opts, data.on_error) for name, opts in data.sources.items()}
    sources = {name: {"options": opts.model_dump(mode="json"), "sha256": fingerprints[name]["sha256"]} for name, opts in data.sources.items()}
    inputs = {
        "format": DATA_FORMAT, "sources": sources, "mix": data.mix, "split": data.split.model_dump(mode="json"),
        "seed": spec.seed, "seq_length": seq_length, "packing": stage.packing, "shard_size_mb": data.shard_size_mb,
        "on_error": data.on_error, "tokenizer": _tokenizer_key(spec, sources),
    }
    inputs_hash = _digest(inputs)
    old = mf.read_if_present(data_dir, log)
    if old is not None and old.get("inputs_hash") != inputs_hash:
        changes = mf.describe_changes(old, inputs, {n: fp["per_file"] for n, fp in fingerprints.items()})
        if data.on_change == "refuse":
            raise UserError(f"the inputs of the shards in {data_dir} changed: {changes}",
                            "restore the inputs, set data.on_change: rebuild, or use another run dir")
        log(f"prepare: inputs changed ({changes}); rebuilding the shards")

    tokenizer = _tokenizer(spec, run_dir, inputs["tokenizer"], registry, log)
    model_vocab = getattr(spec.model, "vocab_size", None)
    if model_vocab is not None and tokenizer.vocab_size > model_vocab:
        raise UserError(f"the tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size is {model_vocab}",
                        f"set model.vocab_size ≥ {tokenizer.vocab_size} (a multiple of 128 is fastest)")

    if old is not None and old.get("inputs_hash") == inputs_hash and old["tokenizer"]["sha256"] == tokenizer.hash:
        problems = mf.shard_problems(data_dir, old)
        if not problems:
            n = sum(len(s["shards"]) for s in old["splits"].values())
            log(f"prepare: inputs unchanged; reusing {n} shards in {data_dir}")
            return {"public": {"reuse": True}, "manifest": old}
        log(f"prepare: rebuilding the shards: {problems[0]}" + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))

    total_bytes = sum(fp.get("bytes", 0) for fp in fingerprints.values())
    target = _piece_bytes(total_bytes, processes.world_size * _workers(data.num_workers, processes.local_world_size))
    policies = {n: ErrorPolicy(data.on_error, log) for n in data.sources}  # missing files and empty globs, found while planning
    found = [u for name, options in data.sources.items()
             for u in units.plan(name, options, SourceContext(f"data.sources.{name}", policies[name], tokenizer), target)]
    pieces: list[list[units.Unit]] = []
    size = 0
    for unit in found:
        if not pieces or size + unit.size > target:
            pieces.append([])
            size = 0
        pieces[-1].append(unit)
        size += unit.size
    return {"public": {"reuse": False, "pieces": [[asdict(u) for u in piece] for piece in pieces]},
            "tokenizer": tokenizer, "inputs": inputs, "inputs_hash": inputs_hash, "fingerprints": fingerprints,
            "seq_length": seq_length, "planning_skips": {n: p.skipped for n, p in policies.items()}, "total_bytes": total_bytes}


def _tokenize_and_build(spec, stage, registry, data_dir: Path, work_dir: Path, sync: _Sync, processes: Processes, plan: dict, log: Log) -> dict:
    """Every process tokenizes its share of the pieces; rank 0 merges them and writes the shards; the others wait for its word."""
    from llmforge.data.tokenizers import load_tokenizer

    data, rank, world = spec.data, processes.rank, processes.world_size
    pieces = [[units.Unit(**u) for u in piece] for piece in plan["public"]["pieces"]]
    mine = {i: piece for i, piece in enumerate(pieces) if i % world == rank}
    workers = _workers(data.num_workers, processes.local_world_size)
    tokenizer_dir = data_dir.parent / "tokenizer"
    dtype = token_dtype((plan.get("tokenizer") or load_tokenizer(tokenizer_dir)).vocab_size)
    start = time.perf_counter()
    failure = None
    try:
        with _progress(sum(u.size for piece in mine.values() for u in piece), enabled=rank == 0) as advance:
            results = tokenize_pieces(mine, tokenizer_dir=tokenizer_dir, work_dir=work_dir, dtype=dtype, workers=workers,
                                      sources=dict(data.sources), on_error=data.on_error, progress=advance)
    except BaseException as e:
        failure = e
        results = [{"index": min(mine, default=-1), "error": _error(e)}]
    sync.publish(f"done-{rank}", {"results": results})
    everyone = [r for other in range(world) for r in (results if other == rank else sync.wait(f"done-{other}")["results"])]
    if failure is not None:
        raise failure
    if (error := first_error(everyone)) is not None:
        _raise(error, "a tokenizer worker")
    elapsed = time.perf_counter() - start
    if rank != 0:
        built = sync.wait("built")
        if "error" in built:
            _raise(built["error"], "rank 0")
        return mf.read_manifest(data_dir)
    try:
        merged = merge(pieces, everyone, list(data.sources), work_dir, dtype)
        manifest = _build(spec, stage, plan, merged, data_dir, elapsed, f"{world} process{'es' * (world != 1)} × {workers} worker{'s' * (workers != 1)}", log)
    except BaseException as e:
        sync.publish("built", {"error": _error(e)})
        raise
    sync.publish("built", {"ok": True})
    return manifest


def _build(spec, stage, plan: dict, merged: Merged, data_dir: Path, elapsed: float, who: str, log: Log) -> dict:
    data = spec.data
    names = list(data.sources)
    tokenizer, fingerprints, seq_length = plan["tokenizer"], plan["fingerprints"], plan["seq_length"]
    dtype = token_dtype(tokenizer.vocab_size)
    streams, counts = merged.streams, merged.counts
    for n in names:
        counts[n].skipped_errors += plan["planning_skips"][n]
        for line in merged.warnings[n][:10]:
            log(line)
        if counts[n].kept == 0:
            c = counts[n]
            raise UserError(f"data.sources.{n} is empty after filtering: {c.documents} documents, {c.empty} empty, {c.too_short} too short, "
                            f"{c.too_long} too long, {c.duplicates} duplicates, {c.skipped_errors} skipped as bad input",
                            "loosen the source's filters or check its paths")
    total_tokens = sum(s.tokens for s in streams.values())
    total_bytes = plan["total_bytes"]
    log(f"prepare: tokenized {total_bytes / 1e6:.1f} MB into {total_tokens:,} tokens in {elapsed:.1f} s "
        f"({total_bytes / 1e6 / max(elapsed, 1e-9):.1f} MB/s, {who})")

    parts = {n: packing.split_source(i, streams[n], data.split.by, data.split.val_fraction, spec.seed) for i, n in enumerate(names)}
    val = packing.Ranges.concat([parts[n]["val"] for n in names])
    mix_stats = None
    if data.mix:
        for n in names:
            if parts[n]["train"].tokens == 0:
                raise UserError(f"data.sources.{n} has no train tokens to mix", "give it more data, or lower split.val_fraction")
        train, mix_stats = packing.mix({n: parts[n]["train"] for n in names}, data.mix, spec.seed)
    else:
        train = packing.Ranges.concat([parts[n]["train"] for n in names])

    mf.invalidate(data_dir)  # from here on, nothing in data_dir is trusted until the new manifest lands
    arrays = [streams[n].array() for n in names]
    splits = {}
    for split, ranges in (("train", train), ("val", val)):
        splits[split] = _write_split(data_dir, split, arrays, ranges, stage.packing, seq_length, dtype, data.shard_size_mb)
    _check_splits(splits, data.split.val_fraction, seq_length)

    manifest = {
        "version": mf.MANIFEST_VERSION,
        "inputs_hash": plan["inputs_hash"],
        "inputs": plan["inputs"],
        "tokenizer": {"kind": getattr(tokenizer, "kind", spec.tokenizer.name), "sha256": tokenizer.hash, "vocab_size": tokenizer.vocab_size,
                      "eos_id": tokenizer.eos_id, "bos_id": tokenizer.bos_id, "pad_id": tokenizer.pad_id},
        "seq_length": seq_length,
        "packing": stage.packing,
        "dtype": dtype.name,
        "sources": {
            n: {
                "name": data.sources[n].name,
                "fingerprint": {k: fingerprints[n].get(k) for k in ("files", "bytes", "mtime_ns", "sha256")},
                "files": fingerprints[n]["per_file"],
                "counts": counts[n].as_dict(),
                "tokens": streams[n].tokens,
                "train_tokens": parts[n]["train"].tokens,
                "val_tokens": parts[n]["val"].tokens,
                **({"mix": {"weight": data.mix[n], "used_tokens": mix_stats.used[n]}} if mix_stats else {}),
            }
            for n in names
        },
        "splits": splits,
    }
    write_json(mf.manifest_path(data_dir), manifest)
    log(f"prepare: train {splits['train']['samples']:,} samples in {len(splits['train']['shards'])} shards, "
        f"val {splits['val']['samples']:,} samples in {len(splits['val']['shards'])} shards → {data_dir}")
    return manifest


def _write_split(data_dir: Path, split: str, arrays: list, ranges: packing.Ranges, mode: str, seq_length: int,
                 dtype: np.dtype, shard_size_mb: float) -> dict:
    writer = ShardWriter(data_dir, split, target_bytes=int(shard_size_mb * 2**20), dtype=dtype)
    stats = packing.PackStats()
    try:
        if mode == "windows":
            for block in packing.windows(packing.gather(arrays, ranges.coalesced()), seq_length, stats):
                writer.add(block)
        else:
            writer.add(packing.documents(arrays, ranges, seq_length, stats))
    except BaseException:
        writer.abort()
        raise
    shards = writer.close()
    return {"tokens": ranges.tokens, "samples": stats.samples, "dropped_tokens": stats.dropped_tokens,
            "max_token_id": writer.max_id, "shards": shards}


def _check_splits(splits: dict, val_fraction: float, seq_length: int) -> None:
    for split, info in splits.items():
        if info["samples"] == 0 and (split == "train" or val_fraction > 0):
            raise UserError(f"the {split} split holds {info['tokens']} tokens, fewer than one sample of seq_length+1 = {seq_length + 1}",
                            "add data, lower model.seq_length" + (", or raise split.val_fraction" if split == "val" else ""))
