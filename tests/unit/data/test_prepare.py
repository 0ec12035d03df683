"""The prepare stage: what the shards and manifest hold, and how re-runs treat them."""

from __future__ import annotations

import hashlib
import io
import json
import math
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from llmforge.data.loader import TokenLoader
from llmforge.data.tokenizers import build_bpe, load_tokenizer
from llmforge.spec import components as c
from llmforge.spec.errors import UserError

from .conftest import make_spec, prepare

BOS, EOS = 256, 257  # the byte tokenizer's bos and eos ids (after the 256 bytes)


def read_split(data_dir: Path, manifest: dict, split: str) -> list[tuple[str, np.ndarray]]:
    """(key, tokens) of every sample of a split, read as plain tar in shard order."""
    out = []
    for shard in manifest["splits"][split]["shards"]:
        with tarfile.open(data_dir / shard["path"]) as tar:
            for m in tar:
                out.append((m.name.split(".")[0], np.load(io.BytesIO(tar.extractfile(m).read()))))
    return out


def doc_texts(corpus: Path) -> set[str]:
    return {p.read_text() for p in corpus.rglob("*.txt")}


def test_manifest_records_shards_tokens_tokenizer_and_sources(prepared, corpus):
    spec, data_dir, m = prepared
    assert m["version"] == 1 and m["seq_length"] == 16 and m["packing"] == "windows" and m["dtype"] == "uint16"
    assert m["tokenizer"]["sha256"] == load_tokenizer(data_dir.parent / "tokenizer").hash
    src = m["sources"]["corpus"]
    files = sorted(corpus.rglob("*.txt"))
    assert src["fingerprint"]["files"] == 30 and src["fingerprint"]["bytes"] == sum(p.stat().st_size for p in files)
    row = next(r for r in src["files"] if r[0] == str(files[0]))
    assert row[1:] == [files[0].stat().st_size, files[0].stat().st_mtime_ns, hashlib.sha256(files[0].read_bytes()).hexdigest()]
    assert src["counts"] == {"documents": 30, "kept": 30, "empty": 0, "too_short": 0, "too_long": 0, "duplicates": 0, "skipped_errors": 0}
    assert src["tokens"] == sum(p.stat().st_size + 2 for p in files) == src["train_tokens"] + src["val_tokens"]  # BOS + text + EOS
    for split in ("train", "val"):
        info = m["splits"][split]
        assert info["samples"] == sum(s["samples"] for s in info["shards"]) == (info["tokens"] - 1) // 16
        assert info["dropped_tokens"] == info["tokens"] - 1 - 16 * info["samples"]
        for shard in info["shards"]:
            path = data_dir / shard["path"]
            assert path.name.startswith("shard-") and path.parent.name == split
            assert shard["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest() and shard["bytes"] == path.stat().st_size
            with tarfile.open(path) as tar:
                assert [mem.offset_data for mem in tar] == shard["offsets"]
    assert len(m["splits"]["train"]["shards"]) > 1  # shard_size_mb 0.01 forces several


def test_windows_are_the_token_stream_split_like_nanogpt(tmp_path):
    text = "".join(f"line {i} of one long file\n" for i in range(200))
    (tmp_path / "one.txt").write_text(text)
    spec = make_spec(tmp_path, sources={"f": {"name": "text", "paths": [str(tmp_path / "one.txt")]}}, data={"split": {"by": "contiguous", "val_fraction": 0.1}})
    m = prepare(spec, tmp_path / "run")
    stream = np.array([BOS, *text.encode(), EOS])
    cut = int(len(stream) * 0.9)
    for split, part in (("train", stream[:cut]), ("val", stream[cut:])):
        samples = read_split(tmp_path / "run" / "data", m, split)
        assert [k for k, _ in samples] == [f"{i:010d}" for i in range(len(samples))]
        expected = [part[i * 16 : i * 16 + 17] for i in range((len(part) - 1) // 16)]
        assert len(samples) == len(expected) and all(np.array_equal(s, e) for (_, s), e in zip(samples, expected))
        assert all(s.dtype == np.uint16 for _, s in samples)


def test_plain_tar_and_webdataset_both_read_the_shards(prepared):
    import webdataset as wds

    _, data_dir, m = prepared
    shard = data_dir / m["splits"]["train"]["shards"][0]["path"]
    listing = subprocess.run(["tar", "-tf", str(shard)], capture_output=True, text=True, check=True).stdout.split()
    assert listing[:2] == ["0000000000.tokens.npy", "0000000001.tokens.npy"] and len(listing) == m["splits"]["train"]["shards"][0]["samples"]
    mine = read_split(data_dir, m, "train")
    ds = wds.WebDataset(str(shard), shardshuffle=False).decode()
    theirs = [(s["__key__"], s["tokens.npy"]) for s in ds]
    assert len(theirs) == len(listing)
    assert all(k1 == k2 and np.array_equal(a, b) for (k1, a), (k2, b) in zip(mine, theirs))


def test_document_split_and_packing_keep_documents_whole(tmp_path, corpus):
    spec = make_spec(tmp_path, seq_length=2000, packing="documents")
    m = prepare(spec, tmp_path / "run")
    texts = {}
    for split in ("train", "val"):
        samples = read_split(tmp_path / "run" / "data", m, split)
        assert all(s[0] == BOS and s[-1] == EOS for _, s in samples)  # BOS opens and EOS closes every document
        texts[split] = {bytes(s[1:-1].astype(np.uint8)).decode() for _, s in samples}
    assert len(texts["val"]) == math.ceil(0.1 * 30) and not texts["train"] & texts["val"]
    assert texts["train"] | texts["val"] == doc_texts(corpus)


def test_document_packing_cuts_long_documents_into_overlapping_pieces(tmp_path):
    (tmp_path / "d.txt").write_text("abcdefghijklmnopqrstuvwxyz" * 3)
    spec = make_spec(tmp_path, sources={"d": {"name": "text", "paths": [str(tmp_path / "d.txt")]}}, packing="documents",
                     data={"split": {"by": "document", "val_fraction": 0.0}})
    m = prepare(spec, tmp_path / "run")
    pieces = [s for _, s in read_split(tmp_path / "run" / "data", m, "train")]
    assert all(2 <= p.size <= 17 for p in pieces)
    assert all(a[-1] == b[0] for a, b in zip(pieces, pieces[1:]))
    assert np.concatenate([pieces[0]] + [p[1:] for p in pieces[1:]]).tolist() == [BOS, *("abcdefghijklmnopqrstuvwxyz" * 3).encode(), EOS]


def test_sources_mix_by_weight(tmp_path):
    for name, ch in (("a", "a"), ("b", "b")):
        (tmp_path / name).mkdir()
        for i in range(20):
            (tmp_path / name / f"{i}.txt").write_text(ch * 200)
    sources = {n: {"name": "text", "paths": [str(tmp_path / n / "*.txt")]} for n in ("a", "b")}
    spec = make_spec(tmp_path, sources=sources, data={"mix": {"a": 0.75, "b": 0.25}, "split": {"by": "document", "val_fraction": 0.0}})
    m = prepare(spec, tmp_path / "run")
    tokens = np.concatenate([s for _, s in read_split(tmp_path / "run" / "data", m, "train")])
    share_a = np.count_nonzero(tokens == ord("a")) / np.count_nonzero((tokens == ord("a")) | (tokens == ord("b")))
    assert share_a == pytest.approx(0.75, abs=0.03)
    assert m["sources"]["a"]["mix"] == {"weight": 0.75, "used_tokens": 202 * 30}  # 20 docs repeated to 1.5×
    assert m["sources"]["b"]["mix"]["used_tokens"] == 202 * 10
    # Interleaved: both sources appear within the first tenth of the windows.
    first = tokens[: tokens.size // 10]
    assert (first == ord("a")).any() and (first == ord("b")).any()


def test_filters_are_counted_in_the_manifest(tmp_path, corpus):
    (corpus / "dup.txt").write_text((corpus / "doc000.txt").read_text())
    (corpus / "tiny.txt").write_text("hi")
    (corpus / "blank.txt").write_text("  \n")
    sources = {"corpus": {"name": "text", "paths": [str(corpus / "**" / "*.txt")], "filters": {"min_chars": 10, "dedup": True}}}
    m = prepare(make_spec(tmp_path, sources=sources), tmp_path / "run")
    assert m["sources"]["corpus"]["counts"] == {"documents": 33, "kept": 30, "empty": 1, "too_short": 1, "too_long": 0, "duplicates": 1, "skipped_errors": 0}


def test_same_inputs_reuse_the_shards(tmp_path, prepared):
    spec, data_dir, first = prepared
    before = {p: p.stat().st_mtime_ns for p in data_dir.rglob("shard-*.tar")}
    logs: list[str] = []
    again = prepare(spec, tmp_path / "run", logs)
    assert again == first and any("reusing" in line for line in logs)
    assert {p: p.stat().st_mtime_ns for p in data_dir.rglob("shard-*.tar")} == before


def test_changed_inputs_rebuild_or_refuse(tmp_path, prepared, corpus):
    spec, data_dir, first = prepared
    (corpus / "sub" / "doc003.txt").write_text("rewritten document\n")
    refuse = make_spec(tmp_path, data={"on_change": "refuse"})
    with pytest.raises(UserError, match=r"inputs of the shards .* changed: source 'corpus': .*doc003.txt changed") as e:
        prepare(refuse, tmp_path / "run")
    assert "on_change: rebuild" in e.value.hint
    assert json.loads((data_dir / "manifest.json").read_text()) == first  # refused: nothing touched
    logs: list[str] = []
    rebuilt = prepare(spec, tmp_path / "run", logs)
    assert any("doc003.txt changed" in line for line in logs)
    assert rebuilt["inputs_hash"] != first["inputs_hash"]
    assert rebuilt["sources"]["corpus"]["tokens"] == sum(p.stat().st_size + 2 for p in corpus.rglob("*.txt"))
    # A changed option (seq_length) is named too.
    with pytest.raises(UserError, match=r"seq_length changed \(16 → 8\)"):
        prepare(make_spec(tmp_path, seq_length=8, data={"on_change": "refuse"}), tmp_path / "run")


def test_a_damaged_shard_is_rebuilt_on_rerun(prepared, tmp_path):
    spec, data_dir, m = prepared
    shard = data_dir / m["splits"]["train"]["shards"][1]["path"]
    shard.write_bytes(shard.read_bytes()[:-1000])
    logs: list[str] = []
    again = prepare(spec, tmp_path / "run", logs)
    assert any(f"{shard} is truncated" in line for line in logs)
    assert again["splits"]["train"]["shards"][1]["sha256"] == hashlib.sha256(shard.read_bytes()).hexdigest()


KILL_SCRIPT = """
import os, sys
from pathlib import Path
from llmforge.data import shards
from tests.unit.data.conftest import make_spec, prepare
closed = []
real = shards.ShardWriter._close_shard
def close_then_die(self):
    real(self)
    closed.append(1)
    if len(closed) == 2:
        os._exit(9)  # as abrupt as SIGKILL: no cleanup, no finally blocks
shards.ShardWriter._close_shard = close_then_die
prepare(make_spec(Path(sys.argv[1])), Path(sys.argv[1]) / "run")
"""


@pytest.mark.slow
def test_a_killed_prepare_leaves_nothing_trusted(tmp_path, prepared, corpus, root):
    spec, data_dir, _ = prepared
    (corpus / "sub" / "doc001.txt").write_text("changed, so the next prepare rebuilds\n")
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(tmp_path)], cwd=root, capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr
    assert not (data_dir / "manifest.json").exists()  # the old manifest went before the first new shard
    assert (data_dir / "train" / "shard-000000.tar").exists()
    with pytest.raises(UserError, match="manifest.json not found"):
        TokenLoader(data_dir, "train", global_batch_size=4, micro_batch_size=2)
    m = prepare(spec, tmp_path / "run")
    loader = TokenLoader(data_dir, "train", global_batch_size=4, micro_batch_size=2)
    assert loader.samples_per_epoch == m["splits"]["train"]["samples"] and loader.next_global_batch()[0].shape == (2, 17)


@pytest.mark.slow
def test_worker_count_does_not_change_the_shards(tmp_path, corpus):
    checksums = []
    for workers in (1, 2):
        m = prepare(make_spec(tmp_path, data={"num_workers": workers}), tmp_path / f"run{workers}")
        checksums.append([s["sha256"] for split in m["splits"].values() for s in split["shards"]])
    assert checksums[0] == checksums[1]


def test_bpe_tokenizer_is_trained_once_and_reused(tmp_path, corpus):
    spec = make_spec(tmp_path, tokenizer={"name": "bpe", "vocab_size": 300, "split_digits": True})
    logs: list[str] = []
    m = prepare(spec, tmp_path / "run", logs)
    tok = load_tokenizer(tmp_path / "run" / "tokenizer")
    assert any("built the bpe tokenizer" in line for line in logs) and m["tokenizer"]["sha256"] == tok.hash
    samples = read_split(tmp_path / "run" / "data", m, "train")
    assert tok.decode(samples[0][1].tolist()).startswith("<|bos|>document 0: ")
    logs.clear()
    prepare(spec, tmp_path / "run", logs)
    assert not any("built" in line for line in logs)


def test_bad_input_is_raised_or_skipped_and_counted(tmp_path, corpus):
    (corpus / "bad.txt").write_bytes(b"ok\n\xff\xfe\n")
    with pytest.raises(UserError, match=r"bad.txt:2: not valid UTF-8"):
        prepare(make_spec(tmp_path), tmp_path / "run")
    m = prepare(make_spec(tmp_path, data={"on_error": "skip"}), tmp_path / "run")
    assert m["sources"]["corpus"]["counts"]["skipped_errors"] == 1 and m["sources"]["corpus"]["counts"]["kept"] == 30


def test_empty_data_vocab_and_split_errors(tmp_path, corpus):
    sources = {"corpus": {"name": "text", "paths": [str(corpus / "**" / "*.txt")], "filters": {"min_chars": 100000}}}
    with pytest.raises(UserError, match=r"data.sources.corpus is empty after filtering: 30 documents, 0 empty, 30 too short"):
        prepare(make_spec(tmp_path, sources=sources), tmp_path / "run")
    # A char vocabulary is known only once built, so this is caught by prepare, not validate.
    with pytest.raises(UserError, match=r"the tokenizer has \d+ tokens but model.vocab_size is 20"):
        prepare(make_spec(tmp_path, vocab_size=20, tokenizer={"name": "char"}), tmp_path / "run2")
    one = {"one": {"name": "text", "paths": [str(corpus / "doc000.txt")]}}
    with pytest.raises(UserError, match=r"the val split holds 0 tokens") as e:
        prepare(make_spec(tmp_path, sources=one), tmp_path / "run3")
    assert "val_fraction" in e.value.hint


def test_finetune_records_are_refused_in_pretraining_data(tmp_path):
    from llmforge.registry.manager import get_registry
    from llmforge.spec.errors import SpecError
    from llmforge.spec.load import load_spec
    from llmforge.spec.validate import spec_model

    (tmp_path / "i.jsonl").write_text(json.dumps({"prompt": "p", "response": "r"}) + "\n")
    with pytest.raises(SpecError, match=r"data.sources.sft \(instructions\) yields finetune records"):
        make_spec(tmp_path, sources={"sft": {"name": "instructions", "paths": [str(tmp_path / "i.jsonl")]}})
    # prepare refuses them too, in a spec handed to it without validate's checks
    spec = spec_model(get_registry()).model_validate(load_spec(str(tmp_path / "spec.yaml")).data)
    with pytest.raises(UserError, match=r"data.sources.sft \(instructions\) yields finetune records"):
        prepare(spec, tmp_path / "run")


def test_webdataset_source_reads_prepared_shards(tmp_path, prepared):
    _, data_dir, m = prepared
    first_train = np.concatenate([s[:-1] for _, s in read_split(data_dir, m, "train")])
    sources = {"old": {"name": "webdataset", "paths": [str(data_dir / "train" / "*.tar")]}}
    spec = make_spec(tmp_path, sources=sources, data={"split": {"by": "contiguous", "val_fraction": 0.0}})
    again = prepare(spec, tmp_path / "run2")
    stream = np.concatenate([s[:-1] for _, s in read_split(tmp_path / "run2" / "data", again, "train")])
    assert again["sources"]["old"]["tokens"] == first_train.size  # the shared window token is not duplicated
    assert np.array_equal(stream, first_train[: stream.size])
    with pytest.raises(UserError, match=r"the bpe tokenizer found no text to train on"):
        prepare(make_spec(tmp_path, sources=sources, tokenizer={"name": "bpe", "vocab_size": 300}), tmp_path / "run3")
    other = build_bpe(c.BPETokenizer(vocab_size=300), run_dir=tmp_path, texts=iter(["some other text"] * 10))
    other.save(tmp_path / "other-tokenizer")
    other_spec = make_spec(tmp_path, sources=sources, tokenizer={"name": "pretrained", "path": str(tmp_path / "other-tokenizer")})
    with pytest.raises(UserError, match=r"shard-000000.tar: was made with a different tokenizer"):
        prepare(other_spec, tmp_path / "run4")


def test_copied_run_dir_is_reused(tmp_path, prepared):
    spec, data_dir, m = prepared
    shutil.copytree(tmp_path / "run", tmp_path / "copy")
    logs: list[str] = []
    assert prepare(spec, tmp_path / "copy", logs)["inputs_hash"] == m["inputs_hash"]
    assert any("reusing" in line for line in logs)


def test_mix_weights_are_validated_with_the_spec(tmp_path, corpus):
    from llmforge.spec.errors import SpecError

    sources = {n: {"name": "text", "paths": [str(corpus / "*.txt")]} for n in ("a", "b")}
    with pytest.raises(SpecError, match=r"data.mix: mix gives no weight to source 'b'"):
        make_spec(tmp_path, sources=sources, data={"mix": {"a": 1.0}})
    with pytest.raises(SpecError, match=r"data.mix.b: mix weight 0.0 of 'b' must be positive"):
        make_spec(tmp_path, sources=sources, data={"mix": {"a": 1.0, "b": 0.0}})


@pytest.mark.slow
def test_shakespeare_char_matches_nanogpt_prepare(tmp_path, tinyshakespeare):
    sources = {"shakespeare": {"name": "text", "paths": [str(tinyshakespeare)]}}
    spec = make_spec(tmp_path, sources=sources, tokenizer={"name": "char"}, seq_length=64, vocab_size=128,
                     data={"split": {"by": "contiguous", "val_fraction": 0.1}, "shard_size_mb": 16})
    m = prepare(spec, tmp_path / "run")
    # nanoGPT's data/shakespeare_char/prepare.py: 65 characters, 1,003,854 train and 111,540 val tokens.
    assert m["tokenizer"]["vocab_size"] == 65
    assert (m["splits"]["train"]["tokens"], m["splits"]["val"]["tokens"]) == (1_003_854, 111_540)
    text = tinyshakespeare.read_text()
    first = read_split(tmp_path / "run" / "data", m, "train")[0][1]
    assert first.tolist() == [sorted(set(text)).index(ch) for ch in text[:65]]


def test_webdataset_source_names_corrupt_shards_and_foreign_ids(tmp_path, prepared):
    from llmforge.data.shards import ShardWriter

    _, data_dir, m = prepared
    loose = tmp_path / "loose"
    loose.mkdir()
    blob = (data_dir / m["splits"]["train"]["shards"][0]["path"]).read_bytes()
    (loose / "cut.tar").write_bytes(blob[: len(blob) // 2 + 100])  # no manifest here to check it against
    spec = make_spec(tmp_path, sources={"old": {"name": "webdataset", "paths": [str(loose / "cut.tar")]}})
    with pytest.raises(UserError, match=r"cut.tar(:\d+)?: (corrupt or truncated tar|truncated tar|bad tokens.npy)"):
        prepare(spec, tmp_path / "run2")
    writer = ShardWriter(tmp_path / "foreign", "train", target_bytes=1 << 20, dtype=np.uint16)
    writer.add([np.arange(20), np.array([1, 2, 300])])
    writer.close()
    spec = make_spec(tmp_path, sources={"old": {"name": "webdataset", "paths": [str(tmp_path / "foreign" / "train" / "*.tar")]}})
    with pytest.raises(UserError, match=r"shard-000000.tar:0000000001: token id 300 ≥ the tokenizer's vocabulary of 262"):
        prepare(spec, tmp_path / "run3")
