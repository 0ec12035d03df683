"""Data as users have it: .gz/.zst text and JSONL, Parquet files, saved HF datasets; finetune records from each;
and bad input (truncated streams, missing fields or columns, non-UTF-8) named by file and line or row."""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

# pyarrow, datasets and zstandard are in [dev], so imported outright: a CI without them fails instead of skipping.
import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from llmforge.data.errors import ErrorPolicy
from llmforge.data.sources import (SourceContext, hf_dataset_source, instruction_source, jsonl_source, parquet_source,
                                   preference_source, text_source)
from llmforge.spec import components as c
from llmforge.spec.errors import UserError

from .conftest import make_spec, prepare


RECORDS = [{"text": f"document {i} " + "words " * (i % 7), "title": f"T{i}"} for i in range(50)]


def ctx(mode: str = "raise", log=None) -> SourceContext:
    return SourceContext("data.sources.src", ErrorPolicy(mode, log=log))


def compress(path: Path, data: bytes) -> Path:
    if path.name.endswith(".gz"):
        path.write_bytes(gzip.compress(data))
    elif path.name.endswith(".zst"):
        path.write_bytes(zstandard.ZstdCompressor().compress(data))
    else:
        path.write_bytes(data)
    return path


def jsonl(records: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


@pytest.mark.parametrize("suffix", ["", ".gz", ".zst"])
def test_compressed_text_and_jsonl_read_like_plain(tmp_path, suffix):
    text = compress(tmp_path / f"a.txt{suffix}", "para one\n\npara two\n".encode())
    assert [d.content for d in text_source(c.TextSource(paths=[str(text)], document="paragraph"), context=ctx())] == ["para one", "para two"]
    lines = compress(tmp_path / f"d.jsonl{suffix}", jsonl(RECORDS))
    docs = list(jsonl_source(c.JsonlSource(paths=[str(lines)]), context=ctx()))
    assert [d.content for d in docs] == [r["text"] for r in RECORDS] and docs[3].origin == f"{lines}:4"


def test_concatenated_gzip_members_and_zstd_frames_are_all_read(tmp_path):
    gz = tmp_path / "cat.jsonl.gz"
    gz.write_bytes(gzip.compress(jsonl(RECORDS[:10])) + gzip.compress(jsonl(RECORDS[10:])))
    zst = tmp_path / "cat.jsonl.zst"
    z = zstandard.ZstdCompressor()
    zst.write_bytes(z.compress(jsonl(RECORDS[:10])) + z.compress(jsonl(RECORDS[10:])))
    for path in (gz, zst):
        assert len(list(jsonl_source(c.JsonlSource(paths=[str(path)]), context=ctx()))) == len(RECORDS)


@pytest.mark.parametrize("suffix", [".gz", ".zst"])
def test_truncated_compressed_files_are_named(tmp_path, suffix):
    kind = "gzip" if suffix == ".gz" else "zstd"
    big = jsonl(RECORDS * 40)
    cut = compress(tmp_path / f"cut.jsonl{suffix}", big)
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    with pytest.raises(UserError, match=rf"cut.jsonl{suffix}: truncated {kind} file") as e:
        list(jsonl_source(c.JsonlSource(paths=[str(cut)]), context=ctx()))
    assert "cut short" in e.value.hint
    good = compress(tmp_path / f"good.jsonl{suffix}", jsonl(RECORDS))
    context = ctx("skip")
    docs = list(jsonl_source(c.JsonlSource(paths=[str(good), str(cut)]), context=context))
    assert context.errors.skipped == 1 and len(docs) >= len(RECORDS)  # the lines before the cut are read
    text = compress(tmp_path / f"cut.txt{suffix}", big)
    text.write_bytes(text.read_bytes()[:-20])
    with pytest.raises(UserError, match=rf"cut.txt{suffix}: (truncated|corrupt) {kind}"):
        list(text_source(c.TextSource(paths=[str(text)]), context=ctx()))


def test_non_utf8_inside_a_compressed_jsonl_names_the_line(tmp_path):
    path = compress(tmp_path / "l.jsonl.gz", b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(UserError, match=r"l.jsonl.gz:2: not valid UTF-8 \(byte 0xe9 at offset 28\)"):
        list(jsonl_source(c.JsonlSource(paths=[str(path)]), context=ctx()))


def write_parquet(path: Path, records: list[dict], row_group_size: int = 8, schema=None) -> Path:
    pq.write_table(pa.Table.from_pylist(records, schema=schema), path, row_group_size=row_group_size)
    return path


def test_parquet_columns_template_and_row_groups(tmp_path, monkeypatch):
    path = write_parquet(tmp_path / "d.parquet", RECORDS)
    docs = list(parquet_source(c.ParquetSource(paths=[str(path)]), context=ctx()))
    assert [d.content for d in docs] == [r["text"] for r in RECORDS] and docs[9].origin == f"{path}:row 9"
    templated = list(parquet_source(c.ParquetSource(paths=[str(path)], template="# {title}\n{text}"), context=ctx()))
    assert templated[1].content == f"# T1\n{RECORDS[1]['text']}"
    # Read a row group at a time: after the first document, one group of 8 rows has been read, not the file.
    groups: list[int] = []
    real = pq.ParquetFile.read_row_group
    monkeypatch.setattr(pq.ParquetFile, "read_row_group", lambda self, i, **kw: groups.append(i) or real(self, i, **kw))
    stream = parquet_source(c.ParquetSource(paths=[str(path)]), context=ctx())
    next(stream)
    assert groups == [0]
    assert len(list(stream)) == len(RECORDS) - 1 and groups == list(range(7))


def test_parquet_bad_input_is_named_by_file_and_row(tmp_path):
    path = write_parquet(tmp_path / "d.parquet", RECORDS)
    with pytest.raises(UserError, match=r"d.parquet: no column 'body' \(columns: text, title\)"):
        list(parquet_source(c.ParquetSource(paths=[str(path)], fields=["body"]), context=ctx()))
    nulls = write_parquet(tmp_path / "n.parquet", [{"text": "a"}, {"text": None}, {"text": "c"}])
    with pytest.raises(UserError, match=r"n.parquet:row 1: field 'text' is NoneType, expected a string"):
        list(parquet_source(c.ParquetSource(paths=[str(nulls)]), context=ctx()))
    binary = write_parquet(tmp_path / "b.parquet", [{"text": b"ok"}, {"text": b"caf\xe9"}], schema=pa.schema([("text", pa.binary())]))
    with pytest.raises(UserError, match=r"b.parquet:row 1 text: not valid UTF-8 \(byte 0xe9 at offset 3\)"):
        list(parquet_source(c.ParquetSource(paths=[str(binary)]), context=ctx()))
    broken = tmp_path / "x.parquet"
    broken.write_bytes(path.read_bytes()[:200])
    with pytest.raises(UserError, match=r"x.parquet: not a readable Parquet file"):
        list(parquet_source(c.ParquetSource(paths=[str(broken)]), context=ctx()))
    context = ctx("skip")
    docs = list(parquet_source(c.ParquetSource(paths=[str(nulls), str(broken), str(binary)]), context=context))
    assert [d.content for d in docs] == ["a", "c", "ok"] and context.errors.skipped == 3


def test_missing_optional_package_names_the_extra(tmp_path, monkeypatch):
    path = write_parquet(tmp_path / "d.parquet", RECORDS)
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if not installed: importing it raises ImportError
    with pytest.raises(UserError, match=r"data.sources.src \(d.parquet\) needs the 'pyarrow' package") as e:
        list(parquet_source(c.ParquetSource(paths=[str(path)]), context=ctx()))
    assert "pip install 'llmforge[parquet]'" in e.value.hint


@pytest.fixture
def offline_env(monkeypatch, tmp_path):
    """An empty HF cache, and the offline switches a user would set: loading must neither fetch nor write there."""
    cache = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HOME", str(cache))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # `datasets` read its cache folder at import, before this test: point the live config at the empty one.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache / "datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", datasets.config.HF_DATASETS_OFFLINE)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", datasets.config.HF_HUB_OFFLINE)
    return cache


@pytest.fixture
def offline(offline_env):
    """offline_env, for sources read in this process: the source must switch `datasets` offline."""
    yield offline_env
    assert datasets.config.HF_DATASETS_OFFLINE and datasets.config.HF_HUB_OFFLINE  # the source switched them on


def _cached_files(cache: Path) -> list[Path]:
    return [p for p in cache.rglob("*") if p.is_file() and not p.name.endswith(".lock")] if cache.exists() else []


def test_hf_dataset_saved_to_disk_with_splits(tmp_path, offline):
    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(RECORDS[:40]),
                          "validation": datasets.Dataset.from_list(RECORDS[40:])}).save_to_disk(str(saved))
    docs = list(hf_dataset_source(c.HFDatasetSource(path=str(saved)), context=ctx()))
    assert [d.content for d in docs] == [r["text"] for r in RECORDS[:40]] and docs[2].origin == f"{saved}[train]:row 2"
    val = list(hf_dataset_source(c.HFDatasetSource(path=str(saved), split="validation", template="{title}: {text}"), context=ctx()))
    assert val[0].content == f"T40: {RECORDS[40]['text']}"
    with pytest.raises(UserError, match=r"has no split 'test' \(splits: train, validation\)"):
        list(hf_dataset_source(c.HFDatasetSource(path=str(saved), split="test"), context=ctx()))
    single = tmp_path / "single"
    datasets.Dataset.from_list(RECORDS).save_to_disk(str(single))
    assert len(list(hf_dataset_source(c.HFDatasetSource(path=str(single)), context=ctx()))) == len(RECORDS)
    assert _cached_files(offline) == []


@pytest.mark.parametrize("kind", ["parquet", "jsonl"])
def test_hf_dataset_folder_of_files_streams_offline(tmp_path, offline, kind):
    folder = tmp_path / "folder"
    folder.mkdir()
    if kind == "parquet":
        write_parquet(folder / "part-0.parquet", RECORDS[:25])
        write_parquet(folder / "part-1.parquet", RECORDS[25:])
    else:
        (folder / "part-0.jsonl").write_bytes(jsonl(RECORDS[:25]))
        (folder / "part-1.jsonl").write_bytes(jsonl(RECORDS[25:]))
    docs = list(hf_dataset_source(c.HFDatasetSource(path=str(folder)), context=ctx()))
    assert [d.content for d in docs] == [r["text"] for r in RECORDS]
    assert _cached_files(offline) == []  # streaming: nothing copied into a cache


def test_hf_dataset_bad_input(tmp_path, offline):
    with pytest.raises(UserError, match=r"dataset folder not found: '.*nowhere'"):
        list(hf_dataset_source(c.HFDatasetSource(path=str(tmp_path / "nowhere")), context=ctx()))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"holds no dataset"):
        list(hf_dataset_source(c.HFDatasetSource(path=str(tmp_path / "empty")), context=ctx()))
    saved = tmp_path / "saved"
    datasets.Dataset.from_list([{"text": "a"}, {"text": None}, {"text": "c"}]).save_to_disk(str(saved))
    with pytest.raises(UserError, match=r"saved\[train\]:row 1: field 'text' is NoneType"):
        list(hf_dataset_source(c.HFDatasetSource(path=str(saved)), context=ctx()))
    with pytest.raises(UserError, match=r"saved\[train\]:row 0: no field 'body' \(fields: text\)"):
        list(hf_dataset_source(c.HFDatasetSource(path=str(saved), fields=["body"]), context=ctx()))
    folder = tmp_path / "badjson"
    folder.mkdir()
    (folder / "a.jsonl").write_text('{"text": "a"}\n{"text": \n')
    with pytest.raises(UserError, match=r"badjson\[train\]:row 0: cannot read the dataset"):
        list(hf_dataset_source(c.HFDatasetSource(path=str(folder)), context=ctx()))


INSTRUCTIONS = [{"prompt": f"{i}+{i}?", "response": str(2 * i)} for i in range(12)]
CHATS = [{"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": f"yo {i}"}]} for i in range(5)]
PAIRS = [{"prompt": f"q{i}", "chosen": "good", "rejected": "bad"} for i in range(6)]


@pytest.mark.parametrize("container", [".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet"])
def test_finetune_sources_read_every_container(tmp_path, container):
    def write(name: str, records: list[dict]) -> str:
        path = tmp_path / f"{name}{container}"
        if container == ".parquet":
            write_parquet(path, records, row_group_size=4)
        else:
            compress(path, jsonl(records))
        return str(path)

    got = [d.content for d in instruction_source(c.InstructionSource(paths=[write("i", INSTRUCTIONS)]), context=ctx())]
    assert got == INSTRUCTIONS
    chats = instruction_source(c.InstructionSource(paths=[write("c", CHATS)], format="messages"), context=ctx())
    assert [d.content for d in chats] == CHATS
    assert [d.content for d in preference_source(c.PreferenceSource(paths=[write("p", PAIRS)]), context=ctx())] == PAIRS


def test_hf_dataset_finetune_records(tmp_path, offline):
    for name, records, fmt in (("i", INSTRUCTIONS, "prompt_response"), ("c", CHATS, "messages"), ("p", PAIRS, "preferences")):
        datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / name))
        options = c.HFDatasetSource(path=str(tmp_path / name), format=fmt)
        docs = [d.content for d in hf_dataset_source(options, context=ctx())]
        assert docs == records and all(set(d) <= options.record_fields for d in docs)
    with pytest.raises(ValueError, match="fields applies to format text, but format is 'messages'"):
        c.HFDatasetSource(path="x", format="messages", fields=["messages"])


def test_prepare_reads_parquet_and_hf_dataset_and_reuses_them(tmp_path, offline_env):
    # prepare reads the sources in its worker processes: the parent's `datasets` config is not the one to check.
    write_parquet(tmp_path / "d.parquet", RECORDS)
    datasets.Dataset.from_list(RECORDS).save_to_disk(str(tmp_path / "saved"))
    compress(tmp_path / "d.jsonl.zst", jsonl(RECORDS))
    sources = {"pq": {"name": "parquet", "paths": [str(tmp_path / "d.parquet")]},
               "hf": {"name": "hf_dataset", "path": str(tmp_path / "saved")},
               "zst": {"name": "jsonl", "paths": [str(tmp_path / "d.jsonl.zst")]}}
    spec = make_spec(tmp_path, sources=sources)
    m = prepare(spec, tmp_path / "run")
    assert m["sources"]["pq"]["tokens"] == m["sources"]["hf"]["tokens"] == m["sources"]["zst"]["tokens"] > 0
    assert _cached_files(offline_env) == []  # the workers streamed the dataset, copying nothing into the cache
    logs: list[str] = []
    prepare(spec, tmp_path / "run", logs)
    assert any("reusing" in line for line in logs)
    write_parquet(tmp_path / "d.parquet", RECORDS[:-1])
    logs.clear()
    prepare(spec, tmp_path / "run", logs)
    assert any("inputs changed" in line and "d.parquet changed" in line for line in logs), logs


def test_validate_checks_the_hf_dataset_folder(tmp_path):
    from llmforge.spec.errors import SpecError

    with pytest.raises(SpecError, match=r"data.sources.hf.path: dataset folder not found"):
        make_spec(tmp_path, sources={"hf": {"name": "hf_dataset", "path": str(tmp_path / "nowhere")}})
