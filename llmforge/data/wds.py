"""The `webdataset` source: standard WebDataset tar shards, local or remote, read through the webdataset library.

Shards are named by local paths and globs, brace patterns (`shard-{000000..000099}.tar`),
`pipe:` commands and `http(s)://` URLs; webdataset's `gopen` streams each one (URLs through
`curl`), so nothing is copied whole to disk. A sample's text is one member (`.txt`, `.md`...)
or a field of its `.json` member; a sample holding `tokens.npy` (llmforge's own shards) is
already tokenized. Local shards inside an llmforge data dir are checked against its manifest.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tarfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from llmforge.data import shards
from llmforge.data.errors import ErrorPolicy
from llmforge.data.files import fingerprint_files, resolve_files
from llmforge.data.sources import Document, SourceContext, UTF8_HINT
from llmforge.spec.errors import UserError

if TYPE_CHECKING:
    from llmforge.data.tokenizers import Tokenizer
    from llmforge.spec import components as c

_CURL_SCHEMES = ("http://", "https://", "sftp://", "ftps://", "scp://")  # those webdataset's gopen hands to curl
_URL = re.compile(r"^[a-z][a-z0-9+.-]*://", re.I)
_TOKENS = shards.MEMBER_SUFFIX[1:]  # `tokens.npy`, the member suffix webdataset's key grouping gives
# curl's exit statuses that users meet, said in words (curl's own message is silenced by `-s`).
_CURL_EXIT = {6: "could not resolve the host", 7: "could not connect to the server", 22: "the server answered with an HTTP error (≥ 400)",
              28: "the transfer timed out", 18: "the transfer ended early", 56: "the connection broke while receiving"}


def is_remote(pattern: str) -> bool:
    """A `pipe:` command or a URL: never globbed, stat'ed or opened by validate."""
    return pattern.startswith("pipe:") or bool(_URL.match(pattern)) and not pattern.startswith("file:")


def expand(patterns: list[str]) -> list[str]:
    """Brace patterns expanded (webdataset's own `braceexpand`), in order."""
    import braceexpand

    return [p for pattern in patterns for p in braceexpand.braceexpand(pattern)]


def _local_patterns(patterns: list[str]) -> list[str]:
    return [p[len("file://"):] if p.startswith("file://") else p for p in patterns]


def shard_urls(options: c.WebDatasetSource, errors: ErrorPolicy, where: str) -> list[str]:
    """Every shard the paths name: remote ones as written, local globs resolved (a missing one goes to the policy)."""
    out: list[str] = []
    for pattern in expand(options.paths):
        if is_remote(pattern):
            out.append(pattern)
        else:
            out += [str(p) for p in resolve_files(_local_patterns([pattern]), [], errors, where)]
    return out


def _check_curl(urls: list[str], where: str) -> None:
    if any(u.lower().startswith(_CURL_SCHEMES) for u in urls) and shutil.which("curl") is None:
        raise UserError(f"{where}: webdataset opens http(s) URLs with `curl`, which is not on PATH",
                        "install curl (apt-get install curl), or name the shards with pipe: commands or local paths")


class _Tail:
    """A read-only stream that remembers its last 1 KiB: a complete tar ends in two zero blocks."""

    def __init__(self, stream: Any) -> None:
        self.stream, self.tail, self.bytes = stream, b"", 0

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        self.bytes += len(data)
        keep = 2 * shards.BLOCK
        self.tail = data[-keep:] if len(data) >= keep else (self.tail + data)[-keep:]
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


def _reason(error: BaseException) -> str:
    """A stream error in words: curl's or the pipe's exit status, or the tar problem."""
    text = str(error.args[0]) if error.args else type(error).__name__
    if m := re.search(r"'curl'.*: exit (\d+)", text, re.S):
        code = int(m.group(1))
        return f"cannot fetch: curl exited {code} ({_CURL_EXIT.get(code, 'see `man curl`, EXIT CODES')})"
    if m := re.search(r": exit (\d+)", text):
        return f"cannot read: the pipe command exited {m.group(1)}"
    return f"corrupt or truncated tar: {text.split(' @ ')[0]}"


def _samples(url: str, errors: ErrorPolicy) -> Iterator[dict]:
    """The samples of one shard through webdataset's gopen → tar_file_expander → group_by_keys; a bad shard goes to the policy."""
    from webdataset.gopen import gopen
    from webdataset.tariterators import group_by_keys, tar_file_expander

    stream = None
    try:
        stream = _Tail(gopen(url))
        yield from group_by_keys(tar_file_expander([{"url": url, "stream": stream}]))
        stream.drain()
        stream.stream.close()  # a pipe's close raises when its command failed
        if stream.tail != bytes(2 * shards.BLOCK):  # tarfile takes a stream cut at a member boundary for a complete one
            errors.bad(url, f"truncated tar: {stream.bytes} bytes, without the two zero blocks that end an archive", "write or fetch the shard again")
    except UserError:
        raise
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:  # ValueError: webdataset's duplicate members; OSError: a pipe's exit
        try:
            if stream is not None:
                stream.stream.close()
        except OSError as closing:  # the command's exit status explains more than the tar it cut short
            e = closing
        errors.bad(url, _reason(e), "check that the shard exists and is reachable (run the command or curl the URL by hand)")


def _text(sample: dict, member: str, field: str | None, where: str, errors: ErrorPolicy) -> str | None:
    if member not in sample:
        have = ", ".join(k for k in sample if not k.startswith("__")) or "none"
        errors.bad(where, f"sample has no .{member} member (members: {have})", "set the source's member to the extension holding the text")
        return None
    raw = sample[member]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        errors.bad(f"{where}.{member}", f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start})", UTF8_HINT)
        return None
    if field is None:
        return text
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        errors.bad(f"{where}.{member}", f"invalid JSON: {e.msg} (column {e.colno})", "the member must hold one JSON object")
        return None
    if not isinstance(record, dict) or field not in record:
        fields = ", ".join(record) if isinstance(record, dict) else f"a {type(record).__name__}, not an object"
        errors.bad(f"{where}.{member}", f"no field {field!r} (fields: {fields or 'none'})", "set the source's field to the one holding the text")
        return None
    if not isinstance(record[field], str):
        errors.bad(f"{where}.{member}", f"field {field!r} is {type(record[field]).__name__}, expected a string", "store the text as a JSON string")
        return None
    return record[field]


def _fits(tokens: np.ndarray, where: str, tok: Tokenizer | None, errors: ErrorPolicy) -> bool:
    if tok is not None and tokens.size and int(tokens.max()) >= tok.vocab_size:
        errors.bad(where, f"token id {int(tokens.max())} ≥ the tokenizer's vocabulary of {tok.vocab_size}",
                   "these shards were made with a bigger vocabulary; prepare them with this run's tokenizer")
        return False
    return True


def _tokens(raw: bytes, where: str, tok: Tokenizer | None, errors: ErrorPolicy) -> np.ndarray | None:
    try:
        tokens = shards.decode_npy(raw)
    except ValueError as e:
        errors.bad(where, f"bad tokens.npy: {e}", "prepare the shard again")
        return None
    return tokens if _fits(tokens, where, tok, errors) else None


def _own_shard(path: Path, context: SourceContext) -> Iterator[Document] | None:
    """The samples of a shard listed by an llmforge manifest, checked against it and this run's tokenizer; None if none lists it."""
    found = shards.find_manifest(path)
    if found is None:
        return None
    manifest, record = found
    tok = context.tokenizer
    if tok is not None and manifest["tokenizer"]["sha256"] != tok.hash:
        context.errors.bad(str(path), "was made with a different tokenizer than this run's",
                           "use the tokenizer of those shards (tokenizer: {name: pretrained, path: <their run>/tokenizer}) or the raw text")
        return iter(())
    problem = shards.file_problem(path, record)
    if problem is not None:
        context.errors.bad(str(path), problem, "prepare those shards again")
        return iter(())
    # Consecutive windows share one token; drop it so the token stream is not duplicated.
    trim = 1 if manifest.get("packing") == "windows" else 0

    def documents() -> Iterator[Document]:
        for key, tokens in shards.iter_tar(path, context.errors):
            if _fits(tokens, f"{path}:{key}", tok, context.errors):
                yield Document(tokens[: tokens.size - trim] if trim else tokens, f"{path}:{key}")

    return documents()


def webdataset_source(options: c.WebDatasetSource, *, context: SourceContext, urls: list[str] | None = None) -> Iterator[Document]:
    """Documents of WebDataset shards: the text of a member (or a .json field), or the tokens of llmforge's own shards.

    `urls`: just these shards (prepare divides a source's shards among its processes).
    """
    if urls is None:
        urls = shard_urls(options, context.errors, f"{context.name}.paths")
    _check_curl(urls, f"{context.name}.paths")
    for url in urls:
        own = None if is_remote(url) else _own_shard(Path(url), context)
        if own is not None:
            yield from own
            continue
        for sample in _samples(url, context.errors):
            where = f"{url}:{sample['__key__']}"
            if _TOKENS in sample:
                tokens = _tokens(sample[_TOKENS], where, context.tokenizer, context.errors)
                if tokens is not None:
                    yield Document(tokens, where)
            elif (text := _text(sample, options.member, options.field, where, context.errors)) is not None:
                yield Document(text, where)


def _head(url: str) -> list:
    """[url, size, validator]: what an HTTP HEAD tells cheaply (Content-Length, ETag or Last-Modified); Nones when it cannot."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=10) as r:
            size = r.headers.get("Content-Length")
            return [url, int(size) if size else None, r.headers.get("ETag") or r.headers.get("Last-Modified")]
    except (OSError, ValueError):
        return [url, None, None]  # reading it reports the problem, named, under the source's error policy


def fingerprint(options: c.WebDatasetSource, errors: ErrorPolicy, where: str) -> dict:
    """What a re-run can know cheaply: local shards by content hash, URLs by size and ETag, `pipe:` commands by their text."""
    urls = expand(options.paths)
    local = _local_patterns([u for u in urls if not is_remote(u)])
    out = fingerprint_files(resolve_files(local, [], errors, where) if local else [])
    rows = []
    for url in urls:
        if url.startswith("pipe:"):
            rows.append([url, None, None, hashlib.sha256(url.encode()).hexdigest()])
        elif is_remote(url):
            _, size, validator = _head(url)
            rows.append([url, size, None, hashlib.sha256(f"{url}\0{size}\0{validator}".encode()).hexdigest()])
    out["per_file"] += rows
    out["files"] += len(rows)
    out["bytes"] += sum(r[1] or 0 for r in rows)
    out["sha256"] = hashlib.sha256(json.dumps([out["sha256"], rows]).encode()).hexdigest()
    return out
