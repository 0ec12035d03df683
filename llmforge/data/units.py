"""Units: the parts of a source's document stream that prepare divides among its processes and workers.

A unit is a file, a byte range of a plain text or JSONL file that starts and ends on a
document boundary, one WebDataset shard, or a whole source (an HF dataset, a plugin's source:
read as one, by one worker). A source's units, read in order, give exactly its documents, so
however the units are divided, the token stream is the same.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from llmforge.data import containers, sources
from llmforge.data.sources import Document, SourceContext
from llmforge.spec.errors import UserError

BLOCK = 4 << 20  # bytes a byte-range reader decodes at a time
_PARAGRAPH_END = re.compile(rb"\n[ \t\r]*\n\s*")  # sources._PARAGRAPH_BREAK on bytes: its ends are paragraph starts


@dataclass(frozen=True)
class Unit:
    """One unit of source `source`: `kind` whole `source`, a `file`, a byte `range` [start, end) of one, or a `shard`."""

    source: str
    kind: str
    path: str = ""
    start: int = 0
    end: int = 0
    size: int = 0  # bytes, to balance the work


class Status:
    """How reading a unit ended, beyond its documents: a file error that affects the file's other units."""

    def __init__(self) -> None:
        self.file_error: str | None = None  # `drop`: the whole file is bad input; `stop`: reading the file stopped here


def document_check(name: str, options, doc: Document) -> Document:
    """The document, if prepare can pack it (text or tokens)."""
    if isinstance(doc.content, dict):
        raise UserError(f"data.sources.{name} ({options.name}) yields finetune records, which prepare cannot pack into pretraining shards",
                        "use this source under an sft stage's data.sources")
    return doc


_NAMES = {"TextSource": "text", "JsonlSource": "jsonl", "ParquetSource": "parquet", "WebDatasetSource": "webdataset"}


def _builtin(options, cls_name: str) -> bool:
    """Whether `options` select the built-in source of that options class (not a plugin's)."""
    from llmforge.spec import components as c

    return isinstance(options, getattr(c, cls_name)) and getattr(options, "name", None) == _NAMES[cls_name]


def _splits_by_line(options) -> str | None:
    """`line` or `paragraph` when a plain file of this source may be cut between documents, else None."""
    if _builtin(options, "TextSource") and options.document != "file":
        return options.document
    if _builtin(options, "JsonlSource"):
        return "line"
    return None


def plan(name: str, options, context: SourceContext, target_bytes: int) -> list[Unit]:
    """The units of one source, in document order; files above `target_bytes` that can be cut are cut near each multiple of it."""
    if _builtin(options, "WebDatasetSource"):
        from llmforge.data import wds

        urls = wds.shard_urls(options, context.errors, f"{context.name}.paths")
        return [Unit(name, "shard", url, size=_size(url)) for url in urls]
    if not any(_builtin(options, n) for n in ("TextSource", "JsonlSource", "ParquetSource")):
        return [Unit(name, "source", size=target_bytes)]
    unit_of_lines = _splits_by_line(options)
    out = []
    for path in sources._files(options, context):
        size = path.stat().st_size
        if unit_of_lines is None or containers.compression(path) or path.name.endswith(".parquet") or size <= target_bytes:
            out.append(Unit(name, "file", str(path), 0, size, size))
            continue
        cuts = _cuts(path, size, -(-size // target_bytes), unit_of_lines)
        out += [Unit(name, "range", str(path), a, b, b - a) for a, b in zip(cuts, cuts[1:])]
    return out


def _size(url: str) -> int:
    try:
        return Path(url).stat().st_size
    except (OSError, ValueError):
        return 1 << 20  # a remote shard: its size is unknown until it is read


def _cuts(path: Path, size: int, parts: int, unit_of_lines: str) -> list[int]:
    """0, the first document boundary at or after each of `parts` - 1 equal steps, and `size` (boundaries taken once)."""
    cuts = [0]
    with open(path, "rb") as f:
        for k in range(1, parts):
            b = _boundary_after(f, size * k // parts, size, unit_of_lines)
            if cuts[-1] < b < size:
                cuts.append(b)
    return cuts + [size]


def _boundary_after(f, x: int, size: int, unit_of_lines: str) -> int:
    window = 1 << 16
    while True:
        f.seek(x)
        buf = f.read(window)
        end = _cut(buf, unit_of_lines, first=True)
        if end > 0:
            return x + end
        if x + len(buf) >= size:
            return size
        window *= 2


def _cut(buf: bytes, unit_of_lines: str, first: bool = False) -> int:
    """Where `buf` may be cut so each side parses as in the whole file: after a newline, or at a paragraph's start; 0: nowhere.

    A paragraph break counts only when something other than whitespace follows it in `buf`: its
    end is then where the whole file's break ends too.
    """
    if unit_of_lines == "line":
        return buf.find(b"\n") + 1 if first else buf.rfind(b"\n") + 1
    found = 0
    for m in _PARAGRAPH_END.finditer(buf):
        if m.end() < len(buf):
            found = m.end()
            if first:
                break
    return found


class _Lines:
    """Line numbers in a byte range of a file; the lines before the range are counted only when a message needs one."""

    def __init__(self, path: Path, start: int) -> None:
        self.path, self.start, self._before = path, start, None

    def before(self) -> int:
        if self._before is None:
            count, left = 0, self.start
            with open(self.path, "rb") as f:
                while left > 0 and (block := f.read(min(BLOCK, left))):
                    count, left = count + block.count(b"\n"), left - len(block)
            self._before = count
        return self._before


class _Place:
    """`file:line`, formatted when a message is written (its line depends on the lines before the range)."""

    __slots__ = ("lines", "line")

    def __init__(self, lines: _Lines, line: int) -> None:
        self.lines, self.line = lines, line

    def __str__(self) -> str:
        return f"{self.lines.path}:{self.lines.before() + self.line}"

    __format__ = lambda self, spec: format(str(self), spec)  # noqa: E731 — f-strings ask __format__


def _blocks(path: Path, start: int, end: int, unit_of_lines: str) -> Iterator[tuple[int, bytes]]:
    """(file offset, bytes) blocks of [start, end), each ending where `_cut` allows (the last at `end`)."""
    with open(path, "rb") as f:
        f.seek(start)
        pos, rest = start, b""
        while pos < end:
            data = f.read(min(BLOCK, end - pos))
            if not data:
                break
            pos += len(data)
            buf = rest + data
            k = len(buf) if pos >= end else _cut(buf, unit_of_lines)
            if k:
                yield pos - len(buf), buf[:k]
            rest = buf[k:]
        if rest:
            yield pos - len(rest), rest


def _text_range(unit: Unit, options, context: SourceContext, status: Status) -> Iterator[Document]:
    """The paragraphs or lines of a byte range of a plain text file; any bad byte makes the whole file bad input, as read_text does."""
    path = Path(unit.path)
    lines, line = _Lines(path, unit.start), 1
    try:
        for offset, block in _blocks(path, unit.start, unit.end, options.document):
            try:
                text = block.decode("utf-8")
            except UnicodeDecodeError as e:
                status.file_error = "drop"
                where = _Place(lines, line + block.count(b"\n", 0, e.start))
                context.errors.bad(str(where), sources._not_utf8(block, e, offset), sources.UTF8_HINT)
                return
            yield from sources.text_documents(text, options.document, lambda n: _Place(lines, n), line)
            line += block.count(b"\n")
    except OSError as e:
        status.file_error = "drop"
        context.errors.bad(str(path), f"cannot read: {e.strerror}", "check that the file exists and is readable")


def _jsonl_lines(unit: Unit, lines: _Lines, status: Status) -> Iterator[tuple[int, int, bytes]]:
    """(line in the range, file offset, line) of a byte range, as containers.lines gives them for a whole file."""
    line = 1
    try:
        for offset, block in _blocks(Path(unit.path), unit.start, unit.end, "line"):
            parts = block.split(b"\n")
            if block.endswith(b"\n"):
                parts.pop()
            for raw in parts:
                yield line, offset, raw
                line, offset = line + 1, offset + len(raw) + 1
    except OSError:
        status.file_error = "stop"  # the whole-file reader keeps what it read and skips the rest of the file
        raise


def read(unit: Unit, options, context: SourceContext, status: Status, registry) -> Iterator[Document]:
    """The documents of one unit, in order; bad input goes to `context.errors`, file-wide problems also to `status`."""
    if unit.kind == "source":
        docs = registry.build("source", options, context=context)
    elif unit.kind == "shard":
        from llmforge.data import wds

        docs = wds.webdataset_source(options, context=context, urls=[unit.path])
    elif unit.kind == "range":
        if _builtin(options, "TextSource"):
            docs = _text_range(unit, options, context, status)
        else:
            lines = _Lines(Path(unit.path), unit.start)
            records = sources._jsonl_records(Path(unit.path), context.errors, _jsonl_lines(unit, lines, status), lambda n: _Place(lines, n))
            docs = sources._texts(records, options.fields, options.template, context.errors)
    else:
        docs = _file(Path(unit.path), options, context)
    return (document_check(unit.source, options, doc) for doc in docs)


def _file(path: Path, options, context: SourceContext) -> Iterator[Document]:
    """One whole file of a built-in file source, as that source reads it."""
    if _builtin(options, "TextSource"):
        text = sources.read_text(path, context.errors)
        if text is None:
            return
        if options.document == "file":
            yield Document(text, str(path))
        else:
            yield from sources.text_documents(text, options.document, lambda line: f"{path}:{line}")
        return
    if path.name.endswith(".parquet"):
        columns = options.fields if _builtin(options, "ParquetSource") and options.template is None else None
        records = sources.parquet_records(path, columns, context)
    else:
        records = sources._jsonl_records(path, context.errors)
    yield from sources._texts(records, options.fields, options.template, context.errors)



def _utf8(path: Path) -> bool:
    """Whether the whole file decodes as UTF-8, checked a block at a time."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        with open(path, "rb") as f:
            while block := f.read(BLOCK):
                decoder.decode(block)
            decoder.decode(b"", final=True)
    except (UnicodeDecodeError, OSError):
        return False
    return True


def stream(name: str, options, context: SourceContext, registry, target_bytes: int = 64 << 20) -> Iterator[Document]:
    """One source's documents in order, as its source yields them, with big plain files read a range at a time
    (what the tokenizer trains on: memory stays bounded by a range, not a file).

    A file is judged whole, as the whole-file readers judge it: a cut text file with a bad byte
    yields nothing (its ranges are read only to report the error), and a read error in a range
    ends the file.
    """
    ended: set[str] = set()
    checked: dict[str, bool] = {}
    for unit in plan(name, options, context, target_bytes):
        if unit.path in ended:
            continue
        status = Status()
        docs = read(unit, options, context, status, registry)
        if unit.kind == "range" and _builtin(options, "TextSource"):
            if unit.path not in checked:
                checked[unit.path] = _utf8(Path(unit.path))
            if not checked[unit.path]:
                for _ in docs:  # reports the bad byte (or raises), as reading the whole file would
                    pass
                if status.file_error:
                    ended.add(unit.path)
                continue
        yield from docs
        if status.file_error:
            ended.add(unit.path)
