"""Per-source document filters (length, exact duplicates), each counted for the manifest or a finetune stage's log."""

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

    def dropped(self) -> str:
        """What was dropped and why, e.g. `1 too short, 2 duplicates`; empty when nothing was."""
        reasons = [(self.empty, "empty"), (self.too_short, "too short"), (self.too_long, "too long"),
                   (self.duplicates, "duplicate" if self.duplicates == 1 else "duplicates"),
                   (self.skipped_errors, "skipped as bad input")]
        return ", ".join(f"{n} {why}" for n, why in reasons if n)


def record_text(record: dict) -> str:
    """A finetune record's full text, which the length filters measure: every message's content, or the
    prompt with its response (or its chosen and rejected answers). Roles and other fields are not text."""
    if "messages" in record:
        return "".join(m["content"] for m in record["messages"])
    return "".join(record[f] for f in ("prompt", "response", "chosen", "rejected") if f in record)


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
        text = record_text(doc.content) if isinstance(doc.content, dict) else doc.content
        if isinstance(text, str) and (not text or text.isspace()):
            counts.empty += 1
            continue
        if not isinstance(doc.content, np.ndarray):
            n = len(text)
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
