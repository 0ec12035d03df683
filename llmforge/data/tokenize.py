"""Parallel tokenization: pieces (runs of units, see units.py) → token files → one token stream per source.

Each worker process reads a piece's units itself (no text crosses a pipe), filters them, runs
HF tokenizers single-threaded (`encode_batch`) on chunks of about a MiB, and appends each text
as BOS (when the tokenizer adds one) + its tokens + EOS to the piece's token file. Every
process of a job tokenizes its share of the pieces this way; `merge` then reads all the
pieces' records in piece order, so the streams do not depend on who tokenized what. Memory
stays flat: a worker holds a chunk, and the merge holds one small number per document.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llmforge.data import units as units_
from llmforge.data.errors import ErrorPolicy
from llmforge.data.filters import FilterCounts, _identity, filtered
from llmforge.data.sources import Document, SourceContext
from llmforge.spec.errors import UserError

CHUNK_CHARS = 1 << 20
CHUNK_DOCS = 8192
_HASH = np.dtype([("key", "V16"), ("text", "?")])  # a text document's content hash; token documents are never duplicates


class SegmentedArray:
    """Read-only token array made of (file, first token, tokens) segments, sliced as one array."""

    def __init__(self, segments: list[tuple[Path, int, int]], dtype: np.dtype) -> None:
        self.segments, self.dtype = segments, dtype
        lengths = np.array([n for _, _, n in segments], dtype=np.int64)
        self.ends = np.cumsum(lengths)
        self.size = int(self.ends[-1]) if len(segments) else 0
        self._maps: dict[Path, np.ndarray] = {}

    def _part(self, i: int) -> np.ndarray:
        path, first, n = self.segments[i]
        if path not in self._maps:
            self._maps[path] = np.memmap(path, dtype=self.dtype, mode="r")
        return self._maps[path][first : first + n]

    def __getitem__(self, s: slice) -> np.ndarray:
        a, b = s.start or 0, self.size if s.stop is None else min(s.stop, self.size)
        if b <= a:
            return np.empty(0, dtype=self.dtype)
        i = int(np.searchsorted(self.ends, a, side="right"))
        base = int(self.ends[i - 1]) if i else 0
        if b <= self.ends[i]:
            return self._part(i)[a - base : b - base]
        parts = []
        while a < b:
            base = int(self.ends[i - 1]) if i else 0
            end = min(b, int(self.ends[i]))
            parts.append(self._part(i)[a - base : end - base])
            a, i = end, i + 1
        return np.concatenate(parts)


@dataclass
class TokenStream:
    """One source's documents, tokenized and concatenated over `segments` of the piece files."""

    segments: list[tuple[Path, int, int]]
    dtype: np.dtype
    doc_lengths: np.ndarray  # int64, one per document, BOS and EOS included

    @property
    def tokens(self) -> int:
        return int(self.doc_lengths.sum())

    def array(self) -> SegmentedArray:
        return SegmentedArray(self.segments, self.dtype)


_worker: dict = {}


def _init_worker(tokenizer_dir: str, dtype: str, sources: dict, on_error: str) -> None:
    from llmforge.data.tokenizers import load_tokenizer
    from llmforge.registry.manager import get_registry

    tok = load_tokenizer(Path(tokenizer_dir))
    _worker.update(tok=tok, dtype=np.dtype(dtype), eos=np.array([] if tok.eos_id is None else [tok.eos_id], dtype=dtype),
                   bos=np.array(tok.start(), dtype=dtype), sources=sources, on_error=on_error, registry=get_registry())


def encode_chunk(items: list[str | np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(flat tokens, per-document lengths) of a chunk; texts get BOS/EOS around them, token docs pass through."""
    tok, dtype, eos, bos = _worker["tok"], _worker["dtype"], _worker["eos"], _worker["bos"]
    texts = [x for x in items if isinstance(x, str)]
    encoded = iter(tok.encode_batch(texts) if texts else [])
    parts: list[np.ndarray] = []
    lengths = np.empty(len(items), dtype=np.int64)
    for i, item in enumerate(items):
        if isinstance(item, str):
            # The same start as every evaluator, preview and prompt sees: pretraining must train it.
            ids = next(encoded)
            parts += [bos, ids, eos]
            lengths[i] = bos.size + ids.size + eos.size
        else:
            parts.append(item)
            lengths[i] = item.size
    flat = np.concatenate(parts).astype(dtype, copy=False) if parts else np.empty(0, dtype=dtype)
    return flat, lengths


def _chunks(docs: Iterable[Document]) -> Iterator[list]:
    items, chars = [], 0
    for doc in docs:
        items.append(doc.content)
        chars += len(doc.content) if isinstance(doc.content, str) else doc.content.size
        if chars >= CHUNK_CHARS or len(items) >= CHUNK_DOCS:
            yield items
            items, chars = [], 0
    if items:
        yield items


def piece_path(work_dir: Path, index: int, what: str) -> Path:
    return work_dir / f"piece-{index:06d}.{what}"


def tokenize_piece(index: int, piece: list[units_.Unit], work_dir: str) -> dict:
    """Tokenize one piece into its token, length and hash files; return its record (per unit: documents, counts, skips)."""
    work = Path(work_dir)
    out: dict = {"index": index, "units": []}
    lengths: list[np.ndarray] = []
    hashes: list[np.ndarray] = []  # aligned with the piece's documents when any of its units deduplicates
    any_dedup = any(getattr(_worker["sources"][u.source], "filters", None) is not None and _worker["sources"][u.source].filters.dedup
                    for u in piece)
    try:
        with open(piece_path(work, index, "tokens"), "wb") as f:
            for unit in piece:
                options = _worker["sources"][unit.source]
                warnings: list[str] = []
                policy = ErrorPolicy(_worker["on_error"], log=warnings.append)
                counts, status = FilterCounts(), units_.Status()
                context = SourceContext(f"data.sources.{unit.source}", policy, _worker["tok"])
                filters = getattr(options, "filters", None)
                dedup = bool(filters and filters.dedup)
                # Duplicates are found across the whole source when the pieces are merged, in document order.
                docs = filtered(units_.read(unit, options, context, status, _worker["registry"]),
                                filters.model_copy(update={"dedup": False}) if dedup else filters, counts)
                n_docs = n_tokens = 0
                for items in _chunks(docs):
                    flat, doc_lengths = encode_chunk(items)
                    flat.tofile(f)
                    lengths.append(doc_lengths)
                    n_docs, n_tokens = n_docs + len(items), n_tokens + flat.size
                    if any_dedup:
                        keys = np.zeros(len(items), dtype=_HASH)
                        for i, item in enumerate(items):
                            if dedup and isinstance(item, str):
                                keys[i] = (_identity(item), True)
                        hashes.append(keys)
                counts.skipped_errors = policy.skipped
                out["units"].append({"docs": n_docs, "tokens": n_tokens, "counts": counts.as_dict(), "file_error": status.file_error,
                                     "warnings": warnings[:10], "dedup": dedup})
        np.save(piece_path(work, index, "lengths.npy"), np.concatenate(lengths) if lengths else np.empty(0, np.int64))
        if any_dedup:
            np.save(piece_path(work, index, "hashes.npy"), np.concatenate(hashes))
    except UserError as e:
        return {"index": index, "error": {"message": e.args[0], "hint": e.hint}}
    except Exception as e:  # a plugin's or our bug: in words, since not every exception survives the trip back through a pipe
        import traceback

        return {"index": index, "error": {"message": f"{type(e).__name__}: {e}", "hint": None, "bug": True,
                                          "traceback": traceback.format_exc()}}
    return out


@contextlib.contextmanager
def _pool(workers: int, initargs: tuple) -> Iterator[mp.pool.Pool]:
    # Forked workers must tokenize single-threaded (they are the parallelism). Setting the
    # variable around the fork also keeps HF tokenizers from warning that a process that
    # used its thread pool was forked; the parent's own setting is restored afterwards.
    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        pool = mp.get_context("fork").Pool(workers, initializer=_init_worker, initargs=initargs)
    finally:
        if saved is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved
    try:
        yield pool
    finally:
        pool.terminate()
        pool.join()


def tokenize_pieces(pieces: dict[int, list[units_.Unit]], *, tokenizer_dir: Path, work_dir: Path, dtype: np.dtype, workers: int,
                    sources: dict, on_error: str, progress: Callable[[int], None] = lambda n: None) -> list[dict]:
    """Tokenize these pieces (index → units) with `workers` processes; their records, in index order.

    Pieces go out in index order; after a piece fails, no later one is started. So the first
    failed piece of all the job's processes is the one a single process would have failed on.
    """
    work_dir.mkdir(parents=True, exist_ok=True)
    results: list[dict] = []
    in_flight: deque = deque()
    failed = False
    with _pool(workers, (str(tokenizer_dir), dtype.str, sources, on_error)) as pool:
        for index in sorted(pieces):
            if failed:
                break
            in_flight.append((sum(u.size for u in pieces[index]), pool.apply_async(tokenize_piece, (index, pieces[index], str(work_dir)))))
            while len(in_flight) >= 2 * workers or (in_flight and in_flight[0][1].ready()):
                size, result = in_flight.popleft()
                results.append(result.get())
                failed = failed or "error" in results[-1]
                progress(size)
        while in_flight:
            size, result = in_flight.popleft()
            results.append(result.get())
            progress(size)
    return results


def first_error(results: Iterable[dict]) -> dict | None:
    """The error of the first failed piece (by index), or None."""
    failed = sorted((r for r in results if "error" in r), key=lambda r: r["index"])
    return failed[0]["error"] if failed else None


@dataclass
class Merged:
    streams: dict[str, TokenStream]
    counts: dict[str, FilterCounts]
    warnings: dict[str, list[str]]


def _file_rules(plan: list[tuple[units_.Unit, dict]]) -> dict[int, int]:
    """Units to leave out, each → the unit whose file-wide error drops it: the whole file (`drop`), or the file's later units (`stop`).

    Only a range of a file can see such an error; the whole-file readers handle their own.
    """
    first: dict[str, int] = {}
    for i, (unit, rec) in enumerate(plan):
        if rec["file_error"] and unit.path not in first:
            first[unit.path] = i
    out = {}
    for i, (unit, rec) in enumerate(plan):
        j = first.get(unit.path)
        if j is not None and unit.kind == "range" and (i > j or plan[j][1]["file_error"] == "drop"):
            out[i] = j
    return out


def merge(pieces: list[list[units_.Unit]], results: list[dict], names: list[str], work_dir: Path, dtype: np.dtype) -> Merged:
    """Every source's token stream, counts and warnings from all the pieces' records, in piece order."""
    by_index = {r["index"]: r for r in results}
    plan = []  # (unit, record, piece index, first doc, first token) in document order
    for index, piece in enumerate(pieces):
        doc = tok = 0
        for unit, rec in zip(piece, by_index[index]["units"]):
            plan.append((unit, rec, index, doc, tok))
            doc, tok = doc + rec["docs"], tok + rec["tokens"]
    left_out = _file_rules([(u, r) for u, r, *_ in plan])
    counts = {n: FilterCounts() for n in names}
    warnings: dict[str, list[str]] = {n: [] for n in names}
    kept: dict[str, list] = {n: [] for n in names}  # (piece, first doc, docs, first token) per unit kept
    dropped_files: set[str] = set()
    for i, (unit, rec, index, doc, tok) in enumerate(plan):
        c = counts[unit.source]
        if i in left_out:
            cause = plan[left_out[i]][1]
            if cause["file_error"] == "drop" and unit.path not in dropped_files:  # counted once, as the whole-file reader does
                dropped_files.add(unit.path)
                c.skipped_errors += 1
                warnings[unit.source] += cause["warnings"][-1:]
            continue
        for key, value in rec["counts"].items():
            setattr(c, key, getattr(c, key) + value)
        warnings[unit.source] += rec["warnings"]
        kept[unit.source].append((index, doc, rec["docs"], tok, rec["dedup"]))
    cache: dict[tuple[int, str], np.ndarray] = {}

    def load(index: int, what: str) -> np.ndarray:
        if (index, what) not in cache:
            if len(cache) > 8:  # a few pieces' maps at a time: the units of a piece are read together
                cache.clear()
            cache[(index, what)] = np.load(piece_path(work_dir, index, what), mmap_mode="r")
        return cache[(index, what)]

    streams = {}
    for name in names:
        per_unit = [(index, doc, n, tok, np.asarray(load(index, "lengths.npy")[doc : doc + n])) for index, doc, n, tok, _ in kept[name]]
        keep = None
        if any(d for *_, d in kept[name]):
            keys = np.concatenate([np.asarray(load(index, "hashes.npy")[doc : doc + n]) for index, doc, n, *_ in kept[name]] or [np.empty(0, _HASH)])
            keep = ~keys["text"]
            _, first = np.unique(keys["key"][keys["text"]], return_index=True)
            keep[np.flatnonzero(keys["text"])[first]] = True
            dupes = int((~keep).sum())
            counts[name].duplicates += dupes
            counts[name].kept -= dupes
        segments, lengths, at = [], [], 0
        for index, doc, n, tok, unit_lengths in per_unit:
            mask = np.ones(n, dtype=bool) if keep is None else keep[at : at + n]
            at += n
            starts = tok + np.concatenate([[0], np.cumsum(unit_lengths)[:-1]]) if n else np.empty(0, np.int64)
            lengths.append(unit_lengths[mask])
            _add_runs(segments, piece_path(work_dir, index, "tokens"), starts[mask], unit_lengths[mask])
        streams[name] = TokenStream(segments, dtype, np.concatenate(lengths) if lengths else np.empty(0, np.int64))
    return Merged(streams, counts, warnings)


def _add_runs(segments: list, path: Path, starts: np.ndarray, lengths: np.ndarray) -> None:
    """Append (path, start, tokens) segments for documents at `starts`, one per run of adjacent documents."""
    if starts.size == 0:
        return
    ends = starts + lengths
    new = np.ones(starts.size, dtype=bool)
    new[1:] = starts[1:] != ends[:-1]
    first = np.flatnonzero(new)
    last = np.append(first[1:] - 1, starts.size - 1)
    for a, b in zip(starts[first].tolist(), ends[last].tolist()):
        if segments and segments[-1][0] == path and segments[-1][1] + segments[-1][2] == a:
            segments[-1] = (path, segments[-1][1], segments[-1][2] + b - a)
        else:
            segments.append((path, a, b - a))

