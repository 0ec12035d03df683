"""Token streams → train/val split → source mixture → samples (windows or whole documents).

Everything here works on (source, start, end) token ranges over the per-source token
files, so the split and the mixture cost one small array per document, never a copy of
the data; tokens are gathered chunk by chunk only while shards are written.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from llmforge.data.tokenize import TokenStream

# Separate random streams per purpose, so adding a source does not reshuffle the split.
_SPLIT, _MIX = 1, 2
GATHER_TOKENS = 1 << 22


def rng(seed: int, purpose: int, *more: int) -> np.random.Generator:
    return np.random.default_rng([seed, purpose, *more])


@dataclass
class Ranges:
    """Token ranges, in stream order: range i is `streams[source[i]][start[i]:end[i]]`."""

    source: np.ndarray
    start: np.ndarray
    end: np.ndarray

    @property
    def tokens(self) -> int:
        return int((self.end - self.start).sum())

    @staticmethod
    def concat(parts: list[Ranges]) -> Ranges:
        return Ranges(*(np.concatenate([getattr(p, f) for p in parts]) if parts else np.empty(0, np.int64) for f in ("source", "start", "end")))

    def take(self, order: np.ndarray) -> Ranges:
        return Ranges(self.source[order], self.start[order], self.end[order])

    def coalesced(self) -> Ranges:
        """Adjacent ranges of one source merged into one (fewer, larger copies when packing windows)."""
        if self.start.size == 0:
            return self
        new = np.ones(self.start.size, dtype=bool)
        new[1:] = (self.source[1:] != self.source[:-1]) | (self.start[1:] != self.end[:-1])
        first = np.flatnonzero(new)
        last = np.append(first[1:] - 1, self.start.size - 1)
        return Ranges(self.source[first], self.start[first], self.end[last])


def split_source(index: int, stream: TokenStream, by: str, val_fraction: float, seed: int) -> dict[str, Ranges]:
    """The train and val ranges of one source.

    `document`: a seeded choice of ceil(fraction × documents) whole documents is val (at
    least one document stays in train). `contiguous`: the last fraction of the tokens.
    """
    ends = np.cumsum(stream.doc_lengths)
    starts = ends - stream.doc_lengths
    n = starts.size
    src = np.full(n, index, dtype=np.int64)
    if by == "document":
        k = min(n - 1, math.ceil(val_fraction * n)) if val_fraction > 0 and n > 0 else 0
        is_val = np.zeros(n, dtype=bool)
        is_val[rng(seed, _SPLIT, index).choice(n, size=k, replace=False)] = True
        return {"train": Ranges(src[~is_val], starts[~is_val], ends[~is_val]), "val": Ranges(src[is_val], starts[is_val], ends[is_val])}
    total = int(ends[-1]) if n else 0
    cut = int(total * (1 - val_fraction))  # nanoGPT's int(n * 0.9), token for token
    train, val = starts < cut, ends > cut
    return {
        "train": Ranges(src[train], starts[train], np.minimum(ends[train], cut)),
        "val": Ranges(src[val], np.maximum(starts[val], cut), ends[val]),
    }


@dataclass
class MixStats:
    used: dict[str, int] = field(default_factory=dict)  # train tokens taken from each source (repeats included)


def mix(per_source: dict[str, Ranges], weights: dict[str, float], seed: int) -> tuple[Ranges, MixStats]:
    """Resample documents so each source makes up its weight's share of the train tokens.

    The total stays the tokens available. A source below its share is repeated (whole
    passes, then a seeded part); one above it is subsampled. Documents of all sources are
    then interleaved in a seeded random order, so every window draws on the mixture.
    """
    stats = MixStats()
    total = sum(r.tokens for r in per_source.values())
    weight_sum = sum(weights.values())
    picked = []
    for i, (name, ranges) in enumerate(per_source.items()):
        lengths = ranges.end - ranges.start
        target = round(weights[name] / weight_sum * total)
        order = rng(seed, _MIX, i).permutation(lengths.size)
        passes, rest = divmod(target, int(lengths.sum()))
        # Whole documents until the remainder is covered (the last one may overshoot a little).
        partial = int(np.searchsorted(np.cumsum(lengths[order]), rest, side="left")) + 1 if rest else 0
        chosen = np.concatenate([np.tile(order, passes), order[:partial]])
        stats.used[name] = int(lengths[chosen].sum())
        picked.append(ranges.take(chosen))
    merged = Ranges.concat(picked)
    return merged.take(rng(seed, _MIX, len(per_source)).permutation(merged.start.size)), stats


def gather(arrays: list[np.ndarray], ranges: Ranges, chunk_tokens: int = GATHER_TOKENS) -> Iterator[np.ndarray]:
    """The tokens of `ranges`, concatenated, in chunks of about `chunk_tokens`."""
    parts, n = [], 0
    for s, a, b in zip(ranges.source.tolist(), ranges.start.tolist(), ranges.end.tolist()):
        parts.append(arrays[s][a:b])
        n += b - a
        if n >= chunk_tokens:
            yield np.concatenate(parts)
            parts, n = [], 0
    if parts:
        yield np.concatenate(parts)


@dataclass
class PackStats:
    samples: int = 0
    dropped_tokens: int = 0  # tokens that are never a prediction target (a tail shorter than a window)


def windows(chunks: Iterator[np.ndarray], seq_length: int, stats: PackStats) -> Iterator[np.ndarray]:
    """[k, seq_length+1] blocks of windows with stride seq_length (neighbours share one token),
    as Megatron's GPTDataset packs: every token but the first is a target exactly once."""
    carry = np.empty(0, dtype=np.int64)
    for chunk in chunks:
        buf = np.concatenate([carry, chunk]) if carry.size else chunk
        n = (buf.size - 1) // seq_length
        if n > 0:
            stats.samples += n
            yield np.lib.stride_tricks.sliding_window_view(buf, seq_length + 1)[::seq_length][:n]
        carry = buf[n * seq_length :]
    stats.dropped_tokens += max(carry.size - 1, 0)


def documents(arrays: list[np.ndarray], ranges: Ranges, seq_length: int, stats: PackStats) -> Iterator[np.ndarray]:
    """One sample per document (a longer one is cut into seq_length+1 pieces that share one token)."""
    for s, a, b in zip(ranges.source.tolist(), ranges.start.tolist(), ranges.end.tolist()):
        doc = arrays[s][a:b]
        for off in range(0, max(doc.size - 1, 0), seq_length):
            piece = doc[off : off + seq_length + 1]
            if piece.size >= 2:
                stats.samples += 1
                yield piece
        if doc.size == 1:
            stats.dropped_tokens += 1
