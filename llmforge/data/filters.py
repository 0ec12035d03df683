"""Per-source document filters (length, exact duplicates), each counted for the manifest."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass

import numpy as np

from llmforge.data.sources import Document


@dataclass
class FilterCounts:
    documents: int = 0  # documents the source produced
    kept: int = 0
    empty: int = 0  # empty or whitespace-only text
    too_short: int = 0
    too_long: int = 0
    duplicates: int = 0
    skipped_errors: int = 0  # bad input skipped under `on_error: skip`

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def _chars(content: str | dict) -> int:
    if isinstance(content, str):
        return len(content)
    return sum(_chars(v) for v in content.values()) if isinstance(content, dict) else sum(_chars(v) for v in content)


def _identity(content: str | dict) -> bytes:
    text = content if isinstance(content, str) else json.dumps(content, sort_keys=True, ensure_ascii=False)
    return hashlib.blake2b(text.encode(), digest_size=16).digest()


def filtered(docs: Iterable[Document], filters, counts: FilterCounts) -> Iterator[Document]:
    """The documents that pass `filters` (a SourceFilters, or None); token documents always pass."""
    seen: set[bytes] = set()
    min_chars = filters.min_chars if filters else 0
    max_chars = filters.max_chars if filters else None
    dedup = bool(filters and filters.dedup)
    for doc in docs:
        counts.documents += 1
        if isinstance(doc.content, str) and (not doc.content or doc.content.isspace()):
            counts.empty += 1
            continue
        if not isinstance(doc.content, np.ndarray):
            n = _chars(doc.content) if min_chars or max_chars is not None else 0
            if n < min_chars:
                counts.too_short += 1
                continue
            if max_chars is not None and n > max_chars:
                counts.too_long += 1
                continue
            if dedup:
                key = _identity(doc.content)
                if key in seen:
                    counts.duplicates += 1
                    continue
                seen.add(key)
        counts.kept += 1
        yield doc
