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

from llmforge.data.errors import ErrorPolicy
from llmforge.data.files import resolve_files

if TYPE_CHECKING:
    from llmforge.data.tokenizers import Tokenizer
    from llmforge.spec import components as c

ROLES = ("system", "user", "assistant")


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
    """The file as UTF-8 text, or None after reporting it as bad (unreadable, undecodable).

    An empty file matched by a glob is no error (a package's empty `__init__.py`); its empty
    document is dropped and counted by the filters. A file named on its own must not be empty.
    """
    try:
        data = path.read_bytes()
    except OSError as e:
        errors.bad(str(path), f"cannot read: {e.strerror}", "check that the file exists and is readable")
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        errors.bad(f"{path}:{line}", f"not valid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start})",
                   "convert the file to UTF-8 (e.g. `iconv -f latin1 -t utf-8`)")
        return None


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
        elif options.document == "paragraph":
            start, line = 0, 1
            for m in [*_PARAGRAPH_BREAK.finditer(text), None]:
                end = m.start() if m else len(text)
                if para := text[start:end].strip():
                    yield Document(para, f"{path}:{line}")
                if m:
                    line += text.count("\n", start, m.end())
                    start = m.end()
        else:
            for i, line_text in enumerate(text.split("\n"), 1):
                if line_text.strip():
                    yield Document(line_text, f"{path}:{i}")


def _json_records(options: c.FileSource, context: SourceContext) -> Iterator[tuple[dict, str]]:
    """(record, 'file:line') for every non-blank line of every file; bad lines go to the policy."""
    for path in _files(options, context):
        text = read_text(path, context.errors)
        if text is None:
            continue
        for i, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            where = f"{path}:{i}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                context.errors.bad(where, f"invalid JSON: {e.msg} (column {e.colno})", "each line must be one JSON object")
                continue
            if not isinstance(record, dict):
                context.errors.bad(where, f"expected a JSON object, got {type(record).__name__}", "each line must be one JSON object")
                continue
            yield record, where


def _strings(record: dict, fields: list[str], where: str, errors: ErrorPolicy) -> dict[str, str] | None:
    """The named fields, all strings; None after reporting the first that is missing or not a string."""
    out = {}
    for f in fields:
        if f not in record:
            errors.bad(where, f"no field {f!r} (fields: {', '.join(record) or 'none'})", "add the field or fix the source's field names")
            return None
        if not isinstance(record[f], str):
            errors.bad(where, f"field {f!r} is {type(record[f]).__name__}, expected a string", "store text fields as JSON strings")
            return None
        out[f] = record[f]
    return out


def jsonl_source(options: c.JsonlSource, *, context: SourceContext) -> Iterator[Document]:
    """JSON Lines; a document is the chosen fields joined by newlines, or formatted by `template`."""
    template_fields = None
    if options.template is not None:
        import string

        template_fields = [name for _, name, _, _ in string.Formatter().parse(options.template) if name]
    for record, where in _json_records(options, context):
        values = _strings(record, template_fields or options.fields, where, context.errors)
        if values is None:
            continue
        text = options.template.format_map(values) if options.template is not None else "\n".join(values.values())
        yield Document(text, where)


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


def instruction_source(options: c.InstructionSource, *, context: SourceContext) -> Iterator[Document]:
    """Instruction records: {prompt, response[, system]} or {messages: [{role, content}, ...]}."""
    for record, where in _json_records(options, context):
        if options.format == "messages":
            messages = _message_list(record, where, context.errors)
            if messages is not None:
                yield Document({"messages": messages}, where)
            continue
        values = _strings(record, ["prompt", "response"], where, context.errors)
        if values is None:
            continue
        if "system" in record:
            system = _strings(record, ["system"], where, context.errors)
            if system is None:
                continue
            values.update(system)
        yield Document(values, where)


def preference_source(options: c.PreferenceSource, *, context: SourceContext) -> Iterator[Document]:
    """Preference records: {prompt, chosen, rejected}."""
    for record, where in _json_records(options, context):
        values = _strings(record, ["prompt", "chosen", "rejected"], where, context.errors)
        if values is not None:
            yield Document(values, where)


def webdataset_source(options: c.WebDatasetSource, *, context: SourceContext) -> Iterator[Document]:
    """Samples of existing llmforge token shards, checked against their manifest and our tokenizer."""
    from llmforge.data import shards

    tok = context.tokenizer
    for path in resolve_files(options.paths, [], context.errors, f"{context.name}.paths"):
        found = shards.find_manifest(path)
        trim = 0
        if found is not None:
            manifest, record = found
            if tok is not None and manifest["tokenizer"]["sha256"] != tok.hash:
                context.errors.bad(str(path), "was made with a different tokenizer than this run's",
                                   "use the tokenizer of those shards (tokenizer: {name: pretrained, path: <their run>/tokenizer}) or the raw text")
                continue
            problem = shards.file_problem(path, record)
            if problem is not None:
                context.errors.bad(str(path), problem, "prepare those shards again")
                continue
            # Consecutive windows share one token; drop it so the token stream is not duplicated.
            trim = 1 if manifest.get("packing") == "windows" else 0
        for key, tokens in shards.iter_tar(path, context.errors):
            if tok is not None and tokens.size and int(tokens.max()) >= tok.vocab_size:
                context.errors.bad(f"{path}:{key}", f"token id {int(tokens.max())} ≥ the tokenizer's vocabulary of {tok.vocab_size}",
                                   "these shards were made with a bigger vocabulary; prepare them with this run's tokenizer")
                continue
            yield Document(tokens[: tokens.size - trim] if trim else tokens, f"{path}:{key}")
