"""Built-in sources: documents, their origins, and bad input named by file and line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmforge.data.errors import ErrorPolicy
from llmforge.data.filters import FilterCounts, filtered
from llmforge.data.sources import SourceContext, instruction_source, jsonl_source, preference_source, text_source
from llmforge.spec import components as c
from llmforge.spec.errors import UserError


def ctx(mode: str = "raise") -> SourceContext:
    return SourceContext("data.sources.src", ErrorPolicy(mode, log=None))


def test_text_documents_by_file_paragraph_and_line(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("first para\nstill first\n\n\nsecond para\n  \nthird\n")
    by_file = list(text_source(c.TextSource(paths=[str(f)]), context=ctx()))
    assert [d.content for d in by_file] == [f.read_text()] and by_file[0].origin == str(f)
    paras = list(text_source(c.TextSource(paths=[str(f)], document="paragraph"), context=ctx()))
    assert [d.content for d in paras] == ["first para\nstill first", "second para", "third"]
    assert [d.origin for d in paras] == [f"{f}:1", f"{f}:5", f"{f}:7"]
    lines = list(text_source(c.TextSource(paths=[str(f)], document="line"), context=ctx()))
    assert [(d.content, d.origin) for d in lines] == [("first para", f"{f}:1"), ("still first", f"{f}:2"), ("second para", f"{f}:5"), ("third", f"{f}:7")]


def test_non_utf8_names_file_and_line(tmp_path):
    f = tmp_path / "latin.txt"
    f.write_bytes("ok line\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(UserError, match=r"latin.txt:2: not valid UTF-8 \(byte 0xe9 at offset 11\)") as e:
        list(text_source(c.TextSource(paths=[str(f)]), context=ctx()))
    assert "iconv" in e.value.hint and "on_error: skip" in e.value.hint
    good = tmp_path / "good.txt"
    good.write_text("fine")
    context = ctx("skip")
    docs = list(text_source(c.TextSource(paths=[str(tmp_path / "*.txt")]), context=context))
    assert [d.content for d in docs] == ["fine"] and context.errors.skipped == 1


def test_jsonl_fields_and_template(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"title": "T", "body": "B", "n": 1}) + "\n\n" + json.dumps({"title": "U", "body": "C"}) + "\n")
    joined = list(jsonl_source(c.JsonlSource(paths=[str(f)], fields=["title", "body"]), context=ctx()))
    assert [d.content for d in joined] == ["T\nB", "U\nC"] and joined[1].origin == f"{f}:3"
    templated = list(jsonl_source(c.JsonlSource(paths=[str(f)], template="# {title}\n\n{body}"), context=ctx()))
    assert [d.content for d in templated] == ["# T\n\nB", "# U\n\nC"]


@pytest.mark.parametrize(("line", "message"), [
    ('{"text": "a"', r"d.jsonl:2: invalid JSON"),
    ('["a"]', r"d.jsonl:2: expected a JSON object, got list"),
    ('{"body": "a"}', r"d.jsonl:2: no field 'text' \(fields: body\)"),
    ('{"text": 5}', r"d.jsonl:2: field 'text' is int, expected a string"),
])
def test_jsonl_bad_lines_are_named(tmp_path, line, message):
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(UserError, match=message):
        list(jsonl_source(c.JsonlSource(paths=[str(f)]), context=ctx()))
    context = ctx("skip")
    assert [d.content for d in jsonl_source(c.JsonlSource(paths=[str(f)]), context=context)] == ["fine"]
    assert context.errors.skipped == 1


def test_instruction_records(tmp_path):
    f = tmp_path / "i.jsonl"
    f.write_text(json.dumps({"prompt": "2+2?", "response": "4", "system": "be brief"}) + "\n")
    (rec,) = instruction_source(c.InstructionSource(paths=[str(f)]), context=ctx())
    assert rec.content == {"prompt": "2+2?", "response": "4", "system": "be brief"}
    chat = tmp_path / "c.jsonl"
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    chat.write_text(json.dumps({"messages": msgs}) + "\n" + json.dumps({"messages": [{"role": "user", "content": "x"}]}) + "\n"
                    + json.dumps({"messages": [{"role": "bot", "content": "x"}]}) + "\n")
    with pytest.raises(UserError, match=r"c.jsonl:2: no assistant message"):
        list(instruction_source(c.InstructionSource(paths=[str(chat)], format="messages"), context=ctx()))
    context = ctx("skip")
    got = list(instruction_source(c.InstructionSource(paths=[str(chat)], format="messages"), context=context))
    assert [d.content for d in got] == [{"messages": msgs}] and context.errors.skipped == 2


def test_preference_records(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": "q", "chosen": "good", "rejected": "bad"}) + "\n" + json.dumps({"prompt": "q", "chosen": "good"}) + "\n")
    with pytest.raises(UserError, match=r"p.jsonl:2: no field 'rejected'"):
        list(preference_source(c.PreferenceSource(paths=[str(f)]), context=ctx()))


def test_filters_count_what_they_drop(tmp_path):
    d = tmp_path / "docs"
    d.mkdir()
    for name, text in {"a": "short", "b": "x" * 50, "c": "x" * 50, "d": "y" * 500, "e": "", "f": "just right " * 3}.items():
        (d / f"{name}.txt").write_text(text)
    opts = c.TextSource(paths=[f"{d}/*.txt"], filters={"min_chars": 10, "max_chars": 100, "dedup": True})
    counts = FilterCounts()
    kept = list(filtered(text_source(opts, context=ctx()), opts.filters, counts))
    assert [Path(doc.origin).name for doc in kept] == ["b.txt", "f.txt"]
    assert counts.as_dict() == {"documents": 6, "kept": 2, "empty": 1, "too_short": 1, "too_long": 1, "duplicates": 1, "skipped_errors": 0}


def test_every_builtin_source_and_tokenizer_is_implemented():
    from llmforge.registry.manager import build_registry

    registry = build_registry()
    for kind in ("source", "tokenizer"):
        for name in registry.names(kind):
            if registry.get(kind, name).provider == "llmforge":
                assert callable(registry.factory(kind, name)), f"{kind} {name}"


def test_each_source_yields_the_records_it_tells_validate(tmp_path):
    """`record_fields`, which validate matches against what a stage reads, covers every record; empty for plain documents."""
    from llmforge.data.tasks import task_source

    (tmp_path / "t.txt").write_text("text")
    (tmp_path / "i.jsonl").write_text(json.dumps({"prompt": "2+2?", "response": "4", "system": "be brief"}) + "\n")
    (tmp_path / "c.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}) + "\n")
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n")
    cases = [
        (text_source, c.TextSource(paths=[str(tmp_path / "t.txt")])),
        (jsonl_source, c.JsonlSource(paths=[str(tmp_path / "p.jsonl")], fields=["prompt"])),
        (instruction_source, c.InstructionSource(paths=[str(tmp_path / "i.jsonl")])),
        (instruction_source, c.InstructionSource(paths=[str(tmp_path / "c.jsonl")], format="messages")),
        (preference_source, c.PreferenceSource(paths=[str(tmp_path / "p.jsonl")])),
        *[(task_source, c.TaskSource(format=kind, num_examples=3)) for kind in ("instructions", "preferences", "text")],
    ]
    for build, options in cases:
        docs = list(build(options, context=ctx()))
        assert docs, options
        for doc in docs:
            if isinstance(doc.content, dict):
                assert set(doc.content) <= options.record_fields, (options, doc.content)
            else:
                assert options.record_fields == frozenset(), options
