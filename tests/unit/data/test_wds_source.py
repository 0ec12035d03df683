"""The webdataset source on shards written by webdataset's own TarWriter: local globs, brace patterns,
`pipe:` commands and URLs served from 127.0.0.1, and each kind of bad shard named by shard and key."""

from __future__ import annotations

import functools
import http.server
import shutil
import socket
import threading
from pathlib import Path

import pytest
import webdataset as wds

from llmforge.data.errors import ErrorPolicy
from llmforge.data.sources import SourceContext
from llmforge.data.wds import webdataset_source
from llmforge.spec import components as c
from llmforge.spec.errors import UserError

from .conftest import WORDS, make_spec, prepare



def write_shards(root: Path, n_shards: int = 3, per_shard: int = 4, member: str = "txt") -> list[str]:
    """Shards of text samples written by webdataset's TarWriter; returns every sample's text in order."""
    root.mkdir(parents=True, exist_ok=True)
    texts = []
    for s in range(n_shards):
        with wds.TarWriter(str(root / f"shard-{s:06d}.tar")) as sink:
            for i in range(per_shard):
                text = f"shard {s} sample {i}: " + " ".join(WORDS[(s + i + j) % len(WORDS)] for j in range(30))
                texts.append(text)
                sink.write({"__key__": f"s{s}-{i:03d}", member: {"text": text, "id": i} if member == "json" else text})
    return texts


def ctx(mode: str = "raise") -> SourceContext:
    return SourceContext("data.sources.web", ErrorPolicy(mode, log=None))


def read(paths: list[str], mode: str = "raise", **options) -> tuple[list, SourceContext]:
    context = ctx(mode)
    return list(webdataset_source(c.WebDatasetSource(paths=paths, **options), context=context)), context


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(folder, base URL): an HTTP server on 127.0.0.1 serving a folder, for the whole module."""
    root = tmp_path_factory.mktemp("served")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_local_glob_braces_and_pipe_read_what_webdataset_reads(tmp_path):
    texts = write_shards(tmp_path / "shards")
    theirs = [s["txt"].decode() for s in wds.WebDataset(str(tmp_path / "shards" / "shard-{000000..000002}.tar"), shardshuffle=False)]
    assert theirs == texts
    by_glob, _ = read([str(tmp_path / "shards" / "*.tar")])
    assert [d.content for d in by_glob] == texts
    assert by_glob[5].origin == f"{tmp_path / 'shards' / 'shard-000001.tar'}:s1-001"
    by_braces, _ = read([str(tmp_path / "shards" / "shard-{000000..000002}.tar")])
    by_pipe, _ = read([f"pipe:cat {tmp_path / 'shards'}/shard-{{000000..000002}}.tar"])
    assert [d.content for d in by_braces] == [d.content for d in by_pipe] == texts
    assert by_pipe[0].origin == f"pipe:cat {tmp_path / 'shards'}/shard-000000.tar:s0-000"


def test_member_extension_and_json_field(tmp_path):
    md = write_shards(tmp_path / "md", n_shards=1, member="md")
    assert [d.content for d in read([str(tmp_path / "md" / "*.tar")], member=".MD")[0]] == md
    js = write_shards(tmp_path / "js", n_shards=1, member="json")
    assert [d.content for d in read([str(tmp_path / "js" / "*.tar")], member="json")[0]] == js
    with pytest.raises(UserError, match=r"shard-000000.tar:s0-000.json: no field 'body' \(fields: text, id\)"):
        read([str(tmp_path / "js" / "*.tar")], member="json", field="body")
    with pytest.raises(ValueError, match="field applies to a .json member"):
        c.WebDatasetSource(paths=["x.tar"], field="text")


def test_http_urls_stream_the_same_samples(tmp_path, served):
    root, base = served
    texts = write_shards(root / "http")
    docs, _ = read([f"{base}/http/shard-{{000000..000002}}.tar"])
    assert [d.content for d in docs] == texts
    assert docs[0].origin == f"{base}/http/shard-000000.tar:s0-000"


def test_prepare_from_urls_equals_prepare_from_files_and_reuses_by_size(tmp_path, served):
    root, base = served
    write_shards(root / "prep", n_shards=2, per_shard=20)
    local = make_spec(tmp_path, sources={"web": {"name": "webdataset", "paths": [str(root / "prep" / "*.tar")]}})
    remote = make_spec(tmp_path, sources={"web": {"name": "webdataset", "paths": [f"{base}/prep/shard-{{000000..000001}}.tar"]}})
    a, b = prepare(local, tmp_path / "local"), prepare(remote, tmp_path / "remote")
    assert a["splits"]["train"]["shards"][0]["sha256"] == b["splits"]["train"]["shards"][0]["sha256"]
    rows = b["sources"]["web"]["files"]
    assert [r[0] for r in rows] == [f"{base}/prep/shard-00000{i}.tar" for i in (0, 1)]
    assert [r[1] for r in rows] == [(root / "prep" / f"shard-00000{i}.tar").stat().st_size for i in (0, 1)]  # Content-Length
    logs: list[str] = []
    prepare(remote, tmp_path / "remote", logs)
    assert any("reusing" in line for line in logs)
    write_shards(root / "prep", n_shards=2, per_shard=60)  # the server now sends bigger shards
    logs.clear()
    prepare(remote, tmp_path / "remote", logs)
    assert any("inputs changed" in line and "shard-000000.tar changed" in line for line in logs), logs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_url_and_missing_shard_are_named(tmp_path, served):
    root, base = served
    write_shards(root / "ok", n_shards=1)
    dead = f"http://127.0.0.1:{_free_port()}/shard-000000.tar"
    with pytest.raises(UserError, match=rf"{dead}: cannot fetch: curl exited 7 \(could not connect to the server\)"):
        read([dead])
    with pytest.raises(UserError, match=rf"{base}/gone.tar: cannot fetch: curl exited 22"):
        read([f"{base}/gone.tar"])
    with pytest.raises(UserError, match=r"pipe:exit 3: cannot read: the pipe command exited 3"):
        read(["pipe:exit 3"])
    docs, context = read([dead, f"{base}/ok/shard-000000.tar"], mode="skip")
    assert len(docs) == 4 and context.errors.skipped == 1


def test_curl_missing_is_a_clear_error(monkeypatch, served):
    _, base = served
    import llmforge.data.wds as module

    monkeypatch.setattr(module.shutil, "which", lambda name: None)
    with pytest.raises(UserError, match=r"data.sources.web.paths: webdataset opens http\(s\) URLs with `curl`, which is not on PATH"):
        read([f"{base}/x.tar"])


@pytest.mark.parametrize("cut", ["mid-member", "at-a-member"])
def test_truncated_shards_are_named_locally_and_over_http(tmp_path, served, cut):
    root, base = served
    write_shards(root / f"cut-{cut}", n_shards=2)
    shard = root / f"cut-{cut}" / "shard-000001.tar"
    data = shard.read_bytes()
    # Each member is a 512-byte header plus its text padded to 512: cutting at 2048 leaves two whole members and no end blocks.
    shard.write_bytes(data[:2048] if cut == "at-a-member" else data[:1000])
    for url in (str(shard), f"{base}/cut-{cut}/shard-000001.tar"):
        says = "truncated tar: 2048 bytes, without the two zero blocks" if cut == "at-a-member" else "corrupt or truncated tar"
        with pytest.raises(UserError, match=rf"{url}: {says}"):
            read([url])
    docs, context = read([f"{base}/cut-{cut}/shard-{{000000..000001}}.tar"], mode="skip")
    assert context.errors.skipped == 1 and 4 <= len(docs) <= 5  # shard 0 whole, and what shard 1 held before the cut


def test_bad_samples_are_named_by_shard_and_key(tmp_path):
    with wds.TarWriter(str(tmp_path / "bad.tar")) as sink:
        sink.write({"__key__": "a", "txt": "fine"})
        sink.write({"__key__": "b", "json": {"text": "no txt"}})
        sink.write({"__key__": "c", "txt": "caf\xe9".encode("latin-1")})
        sink.write({"__key__": "d", "txt": "fine too"})
    bad = str(tmp_path / "bad.tar")
    with pytest.raises(UserError, match=rf"{bad}:b: sample has no .txt member \(members: json\)"):
        read([bad])
    docs, context = read([bad], mode="skip")
    assert [d.content for d in docs] == ["fine", "fine too"] and context.errors.skipped == 2
    messages = []
    policy = ErrorPolicy("skip", log=messages.append)
    list(webdataset_source(c.WebDatasetSource(paths=[bad]), context=SourceContext("data.sources.web", policy)))
    assert any(f"{bad}:c.txt: not valid UTF-8 (byte 0xe9 at offset 3)" in m for m in messages), messages


def test_validate_never_opens_urls_or_pipes_but_checks_brace_shards(tmp_path):
    from llmforge.spec.errors import SpecError

    marker = tmp_path / "ran"
    paths = [f"pipe:touch {marker}", f"http://127.0.0.1:{_free_port()}/a.tar", "gs://bucket/shard-{0..3}.tar"]
    make_spec(tmp_path, sources={"web": {"name": "webdataset", "paths": paths}})
    assert not marker.exists()
    with pytest.raises(SpecError, match=r"data.sources.web.paths\[1\]: webdataset cannot open s3:// URLs .* 'pipe:aws s3 cp s3://b/shard.tar -'"):
        make_spec(tmp_path, sources={"web": {"name": "webdataset", "paths": ["x.tar", "s3://b/shard.tar"]}})
    write_shards(tmp_path / "local", n_shards=2)
    make_spec(tmp_path, sources={"web": {"name": "webdataset", "paths": [str(tmp_path / "local" / "shard-{000000..000001}.tar")]}})
    with pytest.raises(SpecError, match=r"0 files match .*shard-\{000000..000002\}.tar"):
        make_spec(tmp_path, sources={"web": {"name": "webdataset", "paths": [str(tmp_path / "local" / "shard-{000000..000002}.tar")]}})


def test_own_token_shards_copied_elsewhere_read_through_webdataset(tmp_path, corpus):
    """llmforge's token shards, away from their manifest (as in object storage), read through the library as tokens."""
    import numpy as np

    first = prepare(make_spec(tmp_path), tmp_path / "run")
    shard = tmp_path / "run" / "data" / first["splits"]["train"]["shards"][0]["path"]
    (tmp_path / "bucket").mkdir()
    shutil.copy(shard, tmp_path / "bucket" / "shard-000000.tar")
    docs, _ = read([f"pipe:cat {tmp_path / 'bucket' / 'shard-000000.tar'}"])
    theirs = [s for s in wds.WebDataset(str(shard), shardshuffle=False).decode()]
    assert len(docs) == len(theirs) and all(np.array_equal(d.content, t["tokens.npy"]) for d, t in zip(docs, theirs))


def test_bad_input_leaves_data_dir_as_it_was(tmp_path, served):
    """A prepare stopped by bad input writes no shard and no manifest; an earlier complete one stays valid."""
    from llmforge.data.manifest import read_manifest

    root, base = served
    write_shards(root / "keep", n_shards=1, per_shard=20)
    good = make_spec(tmp_path, sources={"web": {"name": "webdataset", "paths": [f"{base}/keep/shard-000000.tar"]}})
    bad = make_spec(tmp_path, sources={"web": {"name": "webdataset", "paths": [f"{base}/keep/shard-000000.tar", f"{base}/keep/gone.tar"]}})
    with pytest.raises(UserError, match="gone.tar: cannot fetch"):
        prepare(bad, tmp_path / "fresh")
    assert not [p for p in (tmp_path / "fresh").rglob("*") if p.is_file() and p.parent.name != "tokenizer"]
    before = prepare(good, tmp_path / "run")
    with pytest.raises(UserError, match="gone.tar: cannot fetch"):
        prepare(bad, tmp_path / "run")
    assert read_manifest(tmp_path / "run" / "data") == before
    assert not (tmp_path / "run" / "data" / ".work").exists()
