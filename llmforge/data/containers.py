"""The containers corpora arrive in: gzip/zstd-compressed files, Parquet files, saved HF datasets.

Each reader streams (a chunk, a row group, a row at a time), so memory stays bounded by the
largest line or row group, never the file. The optional libraries are imported here, late,
and their absence names the extra to install.
"""

from __future__ import annotations

import importlib
import os
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llmforge.spec.errors import UserError

CHUNK = 1 << 20
# What each optional library is for, and the extra of llmforge that installs it.
EXTRAS = {"pyarrow": "parquet", "datasets": "hf", "zstandard": "zstd"}


def optional(module: str, needed_by: str) -> Any:
    """Import an optional dependency, or a UserError naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        extra = EXTRAS[module]
        raise UserError(f"{needed_by} needs the {module!r} package, which is not installed",
                        f"pip install 'llmforge[{extra}]' (or pip install {module})") from None


class Truncated(Exception):
    """A compressed file ends before its end-of-stream marker."""


def compression(path: Path | str) -> str | None:
    name = str(path)
    return "gzip" if name.endswith(".gz") else "zstd" if name.endswith(".zst") else None


def _decompressor(kind: str, where: str) -> Any:
    if kind == "gzip":
        return zlib.decompressobj(wbits=31)
    return optional("zstandard", f"reading {where}").ZstdDecompressor().decompressobj()


def chunks(path: Path) -> Iterator[bytes]:
    """The file's bytes, decompressed by its suffix (`.gz`, `.zst`), in chunks of about 1 MiB.

    Raises Truncated when a compressed stream stops early, OSError when the file cannot be read.
    Concatenated members (`cat a.gz b.gz`, pzstd's frames) are read one after another.
    """
    kind = compression(path)
    with open(path, "rb") as f:
        if kind is None:
            while block := f.read(CHUNK):
                yield block
            return
        d, pending = _decompressor(kind, str(path)), False
        while block := f.read(CHUNK):
            while block:
                try:
                    out = d.decompress(block)
                except Exception as e:  # zlib.error or zstandard.ZstdError, which share no narrower base
                    raise Truncated(f"corrupt {kind} data: {e}") from None
                pending = not d.eof
                if out:
                    yield out
                block = d.unused_data if d.eof else b""
                if block:
                    d = _decompressor(kind, str(path))
            if d.eof:
                d, pending = _decompressor(kind, str(path)), False
        if pending:
            raise Truncated(f"truncated {kind} file: it ends before its end-of-stream marker")


def lines(path: Path) -> Iterator[tuple[int, int, bytes]]:
    """(line number, byte offset of the line in the decompressed stream, line without its newline)."""
    number, offset, rest = 1, 0, b""
    for block in chunks(path):
        parts = (rest + block).split(b"\n")
        rest = parts.pop()
        for line in parts:
            yield number, offset, line
            number, offset = number + 1, offset + len(line) + 1
    if rest:
        yield number, offset, rest


def parquet_rows(path: Path, columns: list[str] | None, needed_by: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(row index, {column: value}) of a Parquet file, one row group in memory at a time.

    Raises KeyError naming a missing column, OSError/ValueError for a file pyarrow cannot read.
    """
    optional("pyarrow", needed_by)
    pq = importlib.import_module("pyarrow.parquet")
    f = pq.ParquetFile(path)
    names = f.schema_arrow.names
    missing = [c for c in columns or [] if c not in names]
    if missing:
        raise KeyError(f"no column {missing[0]!r} (columns: {', '.join(names)})")
    row = 0
    for group in range(f.num_row_groups):
        for record in f.read_row_group(group, columns=columns).to_pylist():
            yield row, record
            row += 1


def hf_rows(path: str, split: str, needed_by: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(row index, record) of a local HF dataset, streamed and offline: nothing is fetched or cached.

    `path` is a folder written by `save_to_disk`, or a folder of Parquet/JSONL files. Raises
    UserError when it is neither or lacks the split.
    """
    # `datasets` reads these once, at import; when it was imported before, its config is set too.
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"
    datasets = optional("datasets", needed_by)
    datasets.config.HF_DATASETS_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    root = Path(path).expanduser()
    if not root.is_dir():
        raise UserError(f"{needed_by}: dataset folder not found: {path!r}",
                        "point path at a folder written by save_to_disk or one holding Parquet/JSONL files")
    if (root / "dataset_dict.json").is_file() or (root / "state.json").is_file():
        saved = datasets.load_from_disk(str(root))
        if isinstance(saved, datasets.DatasetDict):
            if split not in saved:
                raise UserError(f"{needed_by}: {path} has no split {split!r} (splits: {', '.join(saved)})", "set split to one of them")
            saved = saved[split]
        # An Arrow-backed dataset is memory-mapped; iterating it reads a batch at a time.
        stream = saved.to_iterable_dataset()
    else:
        files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
        builder = "parquet" if any(p.suffix == ".parquet" for p in files) else "json"
        suffixes = (".parquet",) if builder == "parquet" else (".jsonl", ".json", ".jsonl.gz", ".jsonl.zst")
        data_files = [str(p) for p in files if p.name.endswith(suffixes)]
        if not data_files:
            raise UserError(f"{needed_by}: {path} holds no dataset (no dataset_dict.json, state.json, *.parquet or *.jsonl)",
                            "save it with Dataset.save_to_disk, or put Parquet/JSONL files in the folder")
        stream = datasets.load_dataset(builder, data_files={split: data_files}, split=split, streaming=True)
    yield from enumerate(stream)
