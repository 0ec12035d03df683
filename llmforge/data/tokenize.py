"""Parallel tokenization: documents → one flat token file per source, each text as BOS (when the
tokenizer adds one) + its tokens + EOS.

The main process reads and filters documents and sends chunks of about a MiB to worker
processes, each running HF tokenizers single-threaded (`encode_batch`); results come back
in order as numpy arrays and are appended to the source's file. A bounded number of
chunks is in flight, so memory stays flat however large the corpus.
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

from llmforge.data.sources import Document

CHUNK_CHARS = 1 << 20
CHUNK_DOCS = 8192


@dataclass
class TokenStream:
    """One source's documents, tokenized and concatenated in `path` (raw `dtype` values)."""

    path: Path
    dtype: np.dtype
    doc_lengths: np.ndarray  # int64, one per document, BOS and EOS included

    @property
    def tokens(self) -> int:
        return int(self.doc_lengths.sum())

    def array(self) -> np.ndarray:
        if self.tokens == 0:
            return np.empty(0, dtype=self.dtype)
        return np.memmap(self.path, dtype=self.dtype, mode="r")


_worker: dict = {}


def _init_worker(tokenizer_dir: str, dtype: str) -> None:
    from llmforge.data.tokenizers import load_tokenizer

    tok = load_tokenizer(Path(tokenizer_dir))
    _worker.update(tok=tok, dtype=np.dtype(dtype), eos=np.array([] if tok.eos_id is None else [tok.eos_id], dtype=dtype),
                   bos=np.array(tok.start(), dtype=dtype))


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


def _chunks(docs: Iterable[tuple[str, Document]]) -> Iterator[tuple[str, list, int]]:
    """(source, items, chars) chunks of about CHUNK_CHARS, never spanning two sources."""
    current, items, chars = None, [], 0
    for source, doc in docs:
        if source != current and items:
            yield current, items, chars
            items, chars = [], 0
        current = source
        items.append(doc.content)
        chars += len(doc.content) if isinstance(doc.content, str) else doc.content.size
        if chars >= CHUNK_CHARS or len(items) >= CHUNK_DOCS:
            yield current, items, chars
            items, chars = [], 0
    if items:
        yield current, items, chars


@contextlib.contextmanager
def _pool(workers: int, tokenizer_dir: Path, dtype: np.dtype) -> Iterator[mp.pool.Pool]:
    # Forked workers must tokenize single-threaded (they are the parallelism). Setting the
    # variable around the fork also keeps HF tokenizers from warning that a process that
    # used its thread pool was forked; the parent's own setting is restored afterwards.
    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        pool = mp.get_context("fork").Pool(workers, initializer=_init_worker, initargs=(str(tokenizer_dir), dtype.str))
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


def tokenize_documents(docs: Iterable[tuple[str, Document]], names: list[str], *, tokenizer_dir: Path, work_dir: Path,
                       dtype: np.dtype, workers: int, progress: Callable[[int], None] = lambda n: None) -> dict[str, TokenStream]:
    """Tokenize `(source name, document)` pairs into one TokenStream per name, in document order."""
    work_dir.mkdir(parents=True, exist_ok=True)
    paths = {name: work_dir / f"source-{i}.tokens" for i, name in enumerate(names)}  # source keys may hold any character
    files = {name: open(path, "wb") for name, path in paths.items()}
    lengths: dict[str, list[np.ndarray]] = {name: [] for name in names}
    in_flight: deque = deque()

    def finish_oldest() -> None:
        source, result, chars = in_flight.popleft()
        flat, doc_lengths = result.get()
        flat.tofile(files[source])
        lengths[source].append(doc_lengths)
        progress(chars)

    try:
        with _pool(workers, tokenizer_dir, dtype) as pool:
            for source, items, chars in _chunks(docs):
                in_flight.append((source, pool.apply_async(encode_chunk, (items,)), chars))
                if len(in_flight) >= 2 * workers + 2:
                    finish_oldest()
            while in_flight:
                finish_oldest()
    finally:
        for f in files.values():
            f.close()
    return {
        name: TokenStream(paths[name], dtype, np.concatenate(lengths[name]) if lengths[name] else np.empty(0, np.int64))
        for name in names
    }
