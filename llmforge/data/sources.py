"""The built-in data sources. Each factory turns its options into an iterator of Documents.

Factories are called as `factory(options, context=SourceContext(...))`. Bad input goes to
`context.errors`, which raises with the place named or skips and counts (`data.on_error`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from llmforge.data import containers
from llmforge.data.errors import ErrorPolicy
from llmforge.data.files import resolve_files
from llmforge.spec.errors import UserError

if TYPE_CHECKING:
    from llmforge.data.tokenizers import Tokenizer
    from llmforge.spec import components as c

ROLES = ("system", "user", "assistant")
TRUNCATED_HINT = "the file was cut short (an interrupted download or copy): fetch or compress it again"
UTF8_HINT = "convert the file to UTF-8 (e.g. `iconv -f latin1 -t utf-8`)"


@dataclass(frozen=True, slots=True)
class Document:
    """One document and where it came from.

    Args:
        content: text; token ids (already tokenized, separators included); or a finetune
            record (a dict: prompt/response, messages, or prompt/chosen/rejected).
        origin: `file`, `file:line` or `shard:key`, for messages about it.
    """

    content: str | np.ndarray | dict[str, Any]
    origin: str


@dataclass
class SourceContext:
    """What a source needs from the run besides its options."""

    name: str  # where the source sits in the spec, for messages: `data.sources.<key>`
    errors: ErrorPolicy
    tokenizer: Tokenizer | None = None  # the run's tokenizer (None while it is being trained)


def read_text(path: Path, errors: ErrorPolicy) -> str | None:
    """The file as UTF-8 text (decompressed when it ends in .gz or .zst), or None after reporting it as bad.

    An empty file matched by a glob is no error (a package's empty `__init__.py`); its empty
    document is dropped and counted by the filters. A file named on its own must not be empty.
    """
    try:
        data = b"".join(containers.chunks(path))
    except OSError as e:
        errors.bad(str(path), f"cannot read: {e.strerror}", "check that the file exists and is readable")
        return None
    except containers.Truncated as e:
        errors.bad(str(path), str(e), TRUNCATED_HINT)
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        errors.bad(f"{path}:{line}", _not_utf8(data, e), UTF8_HINT)
        return None


def _not_utf8(data: bytes, e: UnicodeDecodeError, base: int = 0) -> str:
    return f"not valid UTF-8 (byte 0x{data[e.start]:02x} at offset {base + e.start})"


def _files(options: c.FileSource, context: SourceContext) -> list[Path]:
    return resolve_files(options.paths, options.exclude, context.errors, f"{context.name}.paths")


_PARAGRAPH_BREAK = re.compile(r"\n[ \t\r]*\n\s*")


def text_source(options: c.TextSource, *, context: SourceContext) -> Iterator[Document]:
    """Plain text files; a document is a file, a blank-line-separated paragraph, or a line."""
    for path in _files(options, context):
        text = read_text(path, context.errors)
        if text is None:
            continue
        if options.document == "file":
            yield Document(text, str(path))
        else:
            yield from text_documents(text, options.document, lambda line, path=path: f"{path}:{line}")


def text_documents(text: str, document: str, place, first_line: int = 1) -> Iterator[Document]:
    """The paragraphs or lines of `text` (which starts on line `first_line`); `place(line)` names where one starts."""
    if document == "paragraph":
        start, line = 0, first_line
        for m in [*_PARAGRAPH_BREAK.finditer(text), None]:
            end = m.start() if m else len(text)
            if para := text[start:end].strip():
                yield Document(para, place(line))
            if m:
                line += text.count("\n", start, m.end())
                start = m.end()
    else:
        for i, line_text in enumerate(text.split("\n"), first_line):
            if line_text.strip():
                yield Document(line_text, place(i))


def _file_records(options: c.FileSource, context: SourceContext) -> Iterator[tuple[dict, str]]:
    """(record, place) of every file, by extension: a line of JSONL (plain, .gz, .zst) or a Parquet row."""
    for path in _files(options, context):
        if path.name.endswith(".parquet"):
            yield from parquet_records(path, None, context)
        else:
            yield from _jsonl_records(path, context.errors)


def _jsonl_records(path: Path, errors: ErrorPolicy, lines: Iterator[tuple[int, int, bytes]] | None = None,
                   place=None) -> Iterator[tuple[dict, str]]:
    """(record, 'file:line') for every non-blank line, streamed; bad lines go to the policy.

    `lines` (default: the whole file) and `place(line)` let prepare read a byte range of the file.
    """
    try:
        for i, offset, raw in lines if lines is not None else containers.lines(path):
            where = place(i) if place is not None else f"{path}:{i}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                errors.bad(where, _not_utf8(raw, e, offset), UTF8_HINT)
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                errors.bad(where, f"invalid JSON: {e.msg} (column {e.colno})", "each line must be one JSON object")
                continue
            if not isinstance(record, dict):
                errors.bad(where, f"expected a JSON object, got {type(record).__name__}", "each line must be one JSON object")
                continue
            yield record, where
    except OSError as e:
        errors.bad(str(path), f"cannot read: {e.strerror}", "check that the file exists and is readable")
    except containers.Truncated as e:
        errors.bad(str(path), str(e), TRUNCATED_HINT)


def parquet_records(path: Path, columns: list[str] | None, context: SourceContext) -> Iterator[tuple[dict, str]]:
    """(row, 'file:row N') of a Parquet file, a row group at a time; an unreadable file or missing column goes to the policy."""
    needed_by = f"{context.name} ({path.name})"
    rows = containers.parquet_rows(path, columns, needed_by)
    while True:
        try:
            i, record = next(rows)
        except StopIteration:
            return
        except KeyError as e:
            context.errors.bad(str(path), e.args[0], "fix the source's column names")
            return
        except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
            context.errors.bad(str(path), f"not a readable Parquet file: {e}", "write the file again (pyarrow.parquet.write_table)")
            return
        yield record, f"{path}:row {i}"


def _strings(record: dict, fields: list[str], where: str, errors: ErrorPolicy) -> dict[str, str] | None:
    """The named fields, all strings; None after reporting the first that is missing or not a string."""
    out = {}
    for f in fields:
        if f not in record:
            errors.bad(where, f"no field {f!r} (fields: {', '.join(record) or 'none'})", "add the field or fix the source's field names")
            return None
        value = record[f]
        if isinstance(value, bytes):  # a Parquet or Arrow binary column
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError as e:
                errors.bad(f"{where} {f}", _not_utf8(value, e), "store the column as UTF-8 strings")
                return None
        if not isinstance(value, str):
            errors.bad(where, f"field {f!r} is {type(value).__name__}, expected a string", "store text fields as strings")
            return None
        out[f] = value
    return out


def _texts(records: Iterator[tuple[dict, str]], fields: list[str], template: str | None, errors: ErrorPolicy) -> Iterator[Document]:
    """A document per record: the fields joined by newlines, or formatted by `template`."""
    names = fields
    if template is not None:
        import string

        names = [name for _, name, _, _ in string.Formatter().parse(template) if name]
    for record, where in records:
        values = _strings(record, names, where, errors)
        if values is None:
            continue
        yield Document(template.format_map(values) if template is not None else "\n".join(values.values()), where)


def jsonl_source(options: c.JsonlSource, *, context: SourceContext) -> Iterator[Document]:
    """JSON Lines (plain, .gz or .zst); a document is the chosen fields joined by newlines, or formatted by `template`."""
    yield from _texts(_file_records(options, context), options.fields, options.template, context.errors)


def parquet_source(options: c.ParquetSource, *, context: SourceContext) -> Iterator[Document]:
    """Parquet files, a row group at a time; a document is the chosen columns joined by newlines, or formatted by `template`."""
    columns = options.fields if options.template is None else None
    for path in _files(options, context):
        yield from _texts(parquet_records(path, columns, context), options.fields, options.template, context.errors)


def _message_list(record: dict, where: str, errors: ErrorPolicy) -> list[dict[str, str]] | None:
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        errors.bad(where, "no non-empty 'messages' list", 'write {"messages": [{"role": "user", "content": ...}, ...]}')
        return None
    out = []
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            errors.bad(f"{where} messages[{j}]", f"expected {{role: {'|'.join(ROLES)}, content: string}}, got {json.dumps(m)[:80]}",
                       "fix the message's role or content")
            return None
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in out):
        errors.bad(where, "no assistant message to learn from", "every conversation needs at least one assistant turn")
        return None
    return out


def _instruction(record: dict, where: str, fmt: str, errors: ErrorPolicy) -> dict | None:
    if fmt == "messages":
        messages = _message_list(record, where, errors)
        return None if messages is None else {"messages": messages}
    values = _strings(record, ["prompt", "response"], where, errors)
    if values is not None and record.get("system") is not None:
        system = _strings(record, ["system"], where, errors)
        if system is None:
            return None
        values.update(system)
    return values


def _preference(record: dict, where: str, errors: ErrorPolicy) -> dict | None:
    return _strings(record, ["prompt", "chosen", "rejected"], where, errors)


def instruction_source(options: c.InstructionSource, *, context: SourceContext) -> Iterator[Document]:
    """Instruction records: {prompt, response[, system]} or {messages: [{role, content}, ...]}, from JSONL or Parquet."""
    for record, where in _file_records(options, context):
        if (values := _instruction(record, where, options.format, context.errors)) is not None:
            yield Document(values, where)


def preference_source(options: c.PreferenceSource, *, context: SourceContext) -> Iterator[Document]:
    """Preference records: {prompt, chosen, rejected}, from JSONL or Parquet."""
    for record, where in _file_records(options, context):
        if (values := _preference(record, where, context.errors)) is not None:
            yield Document(values, where)


def _hf_records(options: c.HFDatasetSource, context: SourceContext) -> Iterator[tuple[dict, str]]:
    """(record, 'path[split]:row N') of a local HF dataset; a dataset that cannot be read goes to the policy."""
    rows = containers.hf_rows(options.path, options.split, f"{context.name} (hf_dataset)")
    where = f"{options.path}[{options.split}]"
    i = -1
    while True:
        try:
            i, record = next(rows)
        except StopIteration:
            return
        except UserError:
            raise
        except Exception as e:  # datasets raises many kinds (DatasetGenerationError, ArrowInvalid, FileNotFoundError...)
            context.errors.bad(f"{where}:row {i + 1}", f"cannot read the dataset: {type(e).__name__}: {e}",
                               "check the folder: save it again with save_to_disk, or fix the file the message names")
            return
        yield record, f"{where}:row {i}"


def hf_dataset_source(options: c.HFDatasetSource, *, context: SourceContext) -> Iterator[Document]:
    """A local HF dataset (save_to_disk, or a folder of Parquet/JSONL), streamed offline: text documents or finetune records."""
    records = _hf_records(options, context)
    if options.format == "text":
        yield from _texts(records, options.fields, options.template, context.errors)
        return
    for record, where in records:
        if options.format == "preferences":
            values = _preference(record, where, context.errors)
        else:
            values = _instruction(record, where, options.format, context.errors)
        if values is not None:
            yield Document(values, where)
