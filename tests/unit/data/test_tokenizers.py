"""Tokenizers: what each encodes to, special tokens, save/load, and local pretrained files."""

from __future__ import annotations

import base64
import json

import pytest

from llmforge.data.tokenizers import build_bpe, build_byte, build_char, build_pretrained, load_tokenizer
from llmforge.spec import components as c
from llmforge.spec.checks import tokenizer_vocab_size
from llmforge.spec.errors import UserError

def _named(opts):
    """The options with the `name` the registry adds (tokenizer_vocab_size reads it)."""
    from types import SimpleNamespace

    return SimpleNamespace(name="byte", special_tokens=opts.special_tokens)


TEXTS = ["the cat sat on the mat 1234 times", "the dog sat on 56789 logs", "cats and dogs and mats"] * 50


def test_bpe_splits_digits_and_roundtrips(tmp_path):
    tok = build_bpe(c.BPETokenizer(vocab_size=320, split_digits=True), run_dir=tmp_path, texts=iter(TEXTS))
    digits = {tok.token_to_id(d) for d in "0123456789"}
    ids = tok.encode("pay 1234567 now")
    assert [i for i in ids if i in digits] == [tok.token_to_id(d) for d in "1234567"]
    assert tok.decode(ids) == "pay 1234567 now"
    assert tok.vocab_size <= 320 and tok.encode("the cat") != list("the cat".encode())  # merges were learned
    sp = c.SpecialTokens()
    assert [tok.bos_id, tok.eos_id, tok.pad_id] == [tok.token_to_id(sp.bos), tok.token_to_id(sp.eos), tok.token_to_id(sp.pad)]
    assert all(tok.token_to_id(r) is not None for r in sp.chat_roles)
    assert tok.encode("<|eos|>") == [tok.eos_id]


def test_bpe_needs_text(tmp_path):
    with pytest.raises(UserError, match="found no text to train on"):
        build_bpe(c.BPETokenizer(vocab_size=320), run_dir=tmp_path, texts=iter(()))


def test_bpe_train_max_mb_counts_utf8_bytes_not_characters(tmp_path):
    read = []

    def texts():  # 512 characters, 1 KiB of UTF-8 each
        while True:
            read.append("é" * 512)
            yield read[-1]

    build_bpe(c.BPETokenizer(vocab_size=300, train_max_mb=4 / 1024), run_dir=tmp_path, texts=texts())
    assert len(read) == 4  # 4 KiB; counting characters read 8


def test_bpe_without_split_digits_merges_numbers(tmp_path):
    tok = build_bpe(c.BPETokenizer(vocab_size=320, split_digits=False), run_dir=tmp_path, texts=iter(["1234 " * 200]))
    assert len(tok.encode("1234")) < 4


def test_save_load_roundtrip_and_tamper_check(tmp_path):
    tok = build_bpe(c.BPETokenizer(vocab_size=300), run_dir=tmp_path, texts=iter(TEXTS))
    tok.built_from = "key"
    tok.save(tmp_path / "tok")
    back = load_tokenizer(tmp_path / "tok")
    assert back.hash == tok.hash and back.built_from == "key" and back.eos_id == tok.eos_id
    assert back.encode(TEXTS[0]) == tok.encode(TEXTS[0])
    (tmp_path / "tok" / "tokenizer.json").write_text(tok.json.replace('"the"', '"teh"', 1))
    with pytest.raises(UserError, match="does not match the sha256"):
        load_tokenizer(tmp_path / "tok")
    with pytest.raises(UserError, match="holds no complete tokenizer"):
        load_tokenizer(tmp_path / "nothing")


def test_char_matches_nanogpt_numbering(tmp_path):
    text = "First Citizen:\nBefore we proceed, hear me speak.\n"
    tok = build_char(c.CharTokenizer(), run_dir=tmp_path, texts=iter([text]))
    chars = sorted(set(text))
    assert tok.vocab_size == len(chars) and tok.eos_id is None
    assert tok.encode("hear me\n") == [chars.index(ch) for ch in "hear me\n"]
    assert tok.decode(tok.encode(text)) == text
    with pytest.raises(UserError, match="never saw the characters 'Z'"):
        tok.encode("Zed")
    with_eos = build_char(c.CharTokenizer(add_eos=True), run_dir=tmp_path, texts=iter([text]))
    assert with_eos.eos_id == len(chars) and with_eos.pad_id == with_eos.eos_id


@pytest.mark.parametrize("add_eos", [False, True])
def test_char_table_lookup_encodes_as_hf_does(tmp_path, add_eos):
    """`encode_batch`'s table lookup for char tokenizers (issue 31) gives HF's ids, and leaves to HF what HF decides."""
    import numpy as np

    vocab_text = "First Citizen:\nBefore we proceed, hear me speak.\té€😀<|>"
    tok = build_char(c.CharTokenizer(add_eos=add_eos), run_dir=tmp_path, texts=iter([vocab_text]))
    tok.save(tmp_path / "tok")
    loaded = load_tokenizer(tmp_path / "tok")  # what prepare's workers use
    texts = [vocab_text * 3, "", "é€😀\n\nspeak", "we<|eos|>proceed", "<|eos|>"]
    for t in (tok, loaded):
        hf = [np.array(e.ids, dtype=np.uint32) for e in t.hf.encode_batch_fast(texts, add_special_tokens=False)]
        for ours, theirs in zip(t.encode_batch(texts), hf, strict=True):
            assert ours.dtype == np.uint32 and ours.tolist() == theirs.tolist()
    # An added token's string is HF's to match (one id), not three characters' ids.
    assert (tok._char_ids("<|eos|>") is None) == add_eos
    if add_eos:
        assert tok.encode_batch(["<|eos|>"])[0].tolist() == [tok.eos_id]
    with pytest.raises(UserError, match="never saw the characters 'Z'"):
        tok.encode_batch(["Zed"])
    assert tok._char_ids("a\ud800") is None  # a lone surrogate goes to HF

def test_byte_ids_are_bytes_and_match_the_validate_vocab(tmp_path):
    opts = c.ByteTokenizer()
    tok = build_byte(opts, run_dir=tmp_path, texts=iter(()))
    assert tok.encode("hé!") == list("hé!".encode())
    assert tok.decode(list("hé!".encode())) == "hé!"
    # `validate` predicts the byte vocabulary before anything is built; it must agree.
    assert tok.vocab_size == tokenizer_vocab_size(_named(opts)) == 262
    assert tok.eos_id == 257 and tok.bos_id == 256  # bos, eos, pad, roles: in SpecialTokens order after the bytes


def test_pretrained_tokenizer_json_and_hf_folder(tmp_path):
    tok = build_bpe(c.BPETokenizer(vocab_size=300, special_tokens={"bos": None, "eos": "</s>", "pad": "<pad>", "chat_roles": []}),
                    run_dir=tmp_path, texts=iter(TEXTS))
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "tokenizer.json").write_text(tok.json)
    loaded = build_pretrained(c.PretrainedTokenizer(path=str(folder / "tokenizer.json")), run_dir=tmp_path, texts=iter(()))
    assert loaded.eos_id == tok.token_to_id("</s>")  # found by its common name
    assert loaded.encode(TEXTS[1]) == tok.encode(TEXTS[1])
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<pad>"}, "pad_token": "</s>"}))
    configured = build_pretrained(c.PretrainedTokenizer(path=str(folder)), run_dir=tmp_path, texts=iter(()))
    assert configured.eos_id == tok.token_to_id("<pad>") and configured.pad_id == tok.token_to_id("</s>")


def test_pretrained_without_an_eos_is_refused(tmp_path):
    tok = build_bpe(c.BPETokenizer(vocab_size=300, special_tokens={"bos": None, "eos": "<|x|>", "pad": "<|y|>", "chat_roles": []}),
                    run_dir=tmp_path, texts=iter(TEXTS))
    (tmp_path / "tokenizer.json").write_text(tok.json)
    with pytest.raises(UserError, match="cannot tell which token ends a document"):
        build_pretrained(c.PretrainedTokenizer(path=str(tmp_path / "tokenizer.json")), run_dir=tmp_path, texts=iter(()))
    with pytest.raises(UserError, match="tokenizer file not found"):
        build_pretrained(c.PretrainedTokenizer(path=str(tmp_path / "missing.json")), run_dir=tmp_path, texts=iter(()))


def test_tiktoken_file_becomes_a_byte_level_bpe(tmp_path):
    ranks = {bytes([b]): b for b in range(256)}
    # Every multi-byte token must be the merge of two lower-ranked ones, as in a real ranking.
    for token in (b"ab", b"abc", b" t", b"he", b" the"):
        ranks[token] = len(ranks)
    path = tmp_path / "tiny.tiktoken"
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
    tok = build_pretrained(c.PretrainedTokenizer(path=str(path)), run_dir=tmp_path, texts=iter(()))
    assert tok.encode("abc") == [ranks[b"abc"]]
    assert tok.encode("xab the") == [ranks[b"x"], ranks[b"ab"], ranks[b" the"]]
    assert tok.decode(tok.encode("héllo abc")) == "héllo abc"
    assert tok.eos_id == max(ranks.values()) + 1 and tok.token_to_id("<|endoftext|>") == tok.eos_id
    (tmp_path / "gap.tiktoken").write_text(path.read_text().replace(" 260\n", " 999\n"))
    with pytest.raises(UserError, match="ranks are not 0..260"):
        build_pretrained(c.PretrainedTokenizer(path=str(tmp_path / "gap.tiktoken")), run_dir=tmp_path, texts=iter(()))
    (tmp_path / "junk.model").write_text("not a tokenizer\n")
    with pytest.raises(UserError, match="neither a tokenizer.json nor a tiktoken BPE file"):
        build_pretrained(c.PretrainedTokenizer(path=str(tmp_path / "junk.model")), run_dir=tmp_path, texts=iter(()))
