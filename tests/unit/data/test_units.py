"""Units: byte ranges of a big file read as the whole-file sources read it, and token segments sliced as one array."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from llmforge.data import units
from llmforge.data.errors import ErrorPolicy
from llmforge.data.sources import SourceContext, jsonl_source, text_source
from llmforge.data.tokenize import SegmentedArray
from llmforge.spec.errors import UserError
from llmforge.spec.validate import load_and_validate

PARAGRAPHS = "".join(f"para {i} line one\nline two of {i}" + ["\n\n", "\n \n", "\n\t\r\n\n  ", "\n\n\u00a0", "\n\u00a0\n\n", "\n", "\r\n\r\n"][i % 7]
                     for i in range(400))


def _options(tmp_path: Path, source: dict):
    """The source's options as a spec loads them (the registry's subclass of the options model)."""
    import yaml

    doc = {"name": "t", "tokenizer": {"name": "byte"}, "data": {"sources": {"s": source}},
           "model": {"name": "gpt", "num_layers": 1, "hidden_size": 64, "num_attention_heads": 2, "vocab_size": 512, "seq_length": 16},
           "stages": [{"name": "prepare", "type": "prepare"}]}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(doc))
    return load_and_validate(str(tmp_path / "spec.yaml"))[0].data.sources["s"]


def _ctx(mode: str = "raise", log=None) -> SourceContext:
    return SourceContext("data.sources.s", ErrorPolicy(mode, log=log))


def _by_units(options, target: int, mode: str = "raise") -> tuple[list, list[units.Unit]]:
    found = units.plan("s", options, _ctx(), target)
    docs = []
    for unit in found:
        docs += list(units.read(unit, options, _ctx(mode), units.Status(), registry=None))
    return docs, found


@pytest.mark.parametrize("document", ["line", "paragraph"])
def test_ranges_read_the_documents_and_places_of_the_whole_file(tmp_path, document):
    path = tmp_path / "t.txt"
    path.write_text(PARAGRAPHS)
    options = _options(tmp_path, {"name": "text", "document": document, "paths": [str(path)]})
    whole = list(text_source(options, context=_ctx()))
    for target in (97, 1000, 5000):
        docs, found = _by_units(options, target)
        assert sum(u.kind == "range" for u in found) > 2
        assert [u.start for u in found[1:]] == [u.end for u in found[:-1]] and found[-1].end == path.stat().st_size
        assert [d.content for d in docs] == [d.content for d in whole]
        assert [str(d.origin) for d in docs] == [d.origin for d in whole]


def test_a_bad_byte_in_a_range_is_named_as_the_whole_file_names_it(tmp_path):
    path = tmp_path / "t.txt"
    data = PARAGRAPHS.encode()
    path.write_bytes(data[:7000] + b"\xfe" + data[7000:])
    options = _options(tmp_path, {"name": "text", "document": "line", "paths": [str(path)]})
    with pytest.raises(UserError) as whole:
        list(text_source(options, context=_ctx()))
    with pytest.raises(UserError) as ranged:
        _by_units(options, 1000)
    assert str(ranged.value) == str(whole.value) and "not valid UTF-8 (byte 0xfe at offset 7000)" in str(whole.value)


def test_jsonl_ranges_read_the_records_and_name_bad_lines_like_the_whole_file(tmp_path):
    path = tmp_path / "r.jsonl"
    lines = [json.dumps({"text": f"record {i} " + "x" * (i % 13)}) for i in range(300)]
    lines[211] = "{broken"
    path.write_text("\n".join(lines) + "\n\n")
    options = _options(tmp_path, {"name": "jsonl", "paths": [str(path)]})
    whole_log, ranged_log = [], []
    whole = list(jsonl_source(options, context=_ctx("skip", whole_log.append)))
    found = units.plan("s", options, _ctx(), 500)
    docs = [d for u in found for d in units.read(u, options, _ctx("skip", ranged_log.append), units.Status(), registry=None)]
    assert len(found) > 10 and [d.content for d in docs] == [d.content for d in whole]
    assert ranged_log == whole_log == [f"warning: skipped {path}:212: invalid JSON: Expecting property name enclosed in double quotes (column 2)"]


def test_only_files_that_can_be_cut_are(tmp_path):
    import gzip

    (tmp_path / "a.txt.gz").write_bytes(gzip.compress(PARAGRAPHS.encode()))
    (tmp_path / "b.txt").write_text(PARAGRAPHS)
    whole_files = _options(tmp_path, {"name": "text", "paths": [str(tmp_path / "b.txt")]})  # document: file
    assert [u.kind for u in units.plan("s", whole_files, _ctx(), 100)] == ["file"]
    compressed = _options(tmp_path, {"name": "text", "document": "line", "paths": [str(tmp_path / "a.txt.gz")]})
    assert [u.kind for u in units.plan("s", compressed, _ctx(), 100)] == ["file"]


def test_segmented_array_slices_across_files(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    np.arange(10, dtype=np.uint16).tofile(a)
    np.arange(100, 110, dtype=np.uint16).tofile(b)
    arr = SegmentedArray([(a, 2, 5), (b, 0, 3), (a, 8, 2)], np.dtype(np.uint16))
    whole = np.array([2, 3, 4, 5, 6, 100, 101, 102, 8, 9])
    assert arr.size == 10
    for i in range(11):
        for j in range(i, 11):
            assert arr[i:j].tolist() == whole[i:j].tolist()


def test_the_tokenizer_reads_big_files_a_range_at_a_time_and_judges_them_whole(tmp_path):
    """units.stream (what the tokenizer trains on) gives the source's documents, skips and messages, a range in memory at a time."""
    good, bad = tmp_path / "good.txt", tmp_path / "bad.txt"
    good.write_text(PARAGRAPHS)
    data = PARAGRAPHS.encode()
    bad.write_bytes(data[:9000] + b"\xc3(" + data[9000:])
    options = _options(tmp_path, {"name": "text", "document": "line", "paths": [str(good), str(bad), str(good)]})
    logs = {"whole": [], "stream": []}
    whole_ctx, stream_ctx = _ctx("skip", logs["whole"].append), _ctx("skip", logs["stream"].append)
    whole = list(text_source(options, context=whole_ctx))
    streamed = list(units.stream("s", options, stream_ctx, registry=None, target_bytes=1000))
    assert [d.content for d in streamed] == [d.content for d in whole] and len(whole) > 0
    assert logs["stream"] == logs["whole"] and stream_ctx.errors.skipped == whole_ctx.errors.skipped == 1


def test_a_failure_inside_a_worker_ends_prepare_with_it_named(tmp_path, monkeypatch):
    """An exception a reader raises in a tokenizer worker (a plugin's, a bug) stops prepare with its words and traceback."""
    from .conftest import make_spec, prepare, write_corpus

    write_corpus(tmp_path / "corpus", n_docs=5)
    spec = make_spec(tmp_path)

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a reader's bug")

    monkeypatch.setattr(units, "read", broken)  # the forked workers inherit it
    with pytest.raises(RuntimeError, match=r"prepare failed in a tokenizer worker: ZeroDivisionError: a reader's bug\n.*Traceback"):
        prepare(spec, tmp_path / "run")
    assert not (tmp_path / "run" / "data" / ".work").exists()
