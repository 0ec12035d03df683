"""An imported HF tokenizer keeps its HF files byte for byte wherever llmforge saves it (the import,
every run's tokenizer/), checked by sha256 like tokenizer.json; generation stops at every id of
its generation_config.json `eos_token_id`, as transformers' `generate` does."""

from __future__ import annotations

import json

import pytest

from llmforge.data.tokenizers import HFTokenizer, build_bpe, load_tokenizer
from llmforge.spec import components as c
from llmforge.spec.errors import UserError

TEXTS = ["the cat sat on the mat", "the dog sat on the log"] * 20


def _imported(tmp_path, generation: dict | None = None) -> HFTokenizer:
    base = build_bpe(c.BPETokenizer(vocab_size=300, special_tokens={"bos": "<s>", "eos": "</s>", "pad": "<pad>", "chat_roles": [],
                                                                     "extra": ["<|eot|>"]}),
                     run_dir=tmp_path, texts=iter(TEXTS))
    files = {"tokenizer_config.json": json.dumps({"bos_token": "<s>", "eos_token": "</s>"}, indent=2) + "\r\n  "}
    if generation is not None:
        files["generation_config.json"] = json.dumps(generation)
    text = base.hf.to_str(pretty=True)  # not what to_str() gives: kept as it was read
    return HFTokenizer(base.hf, kind="pretrained", eos="</s>", bos="<s>", pad=None, text=text, files=files)


def test_stop_ids_are_the_generation_configs_eos_ids(tmp_path):
    tok = _imported(tmp_path, {"eos_token_id": [2, 1]})
    eot = tok.token_to_id("<|eot|>")
    assert (tok.bos_id, tok.eos_id) == (0, 1)
    assert tok.stop_ids == (2, 1)
    assert _imported(tmp_path, {"eos_token_id": eot}).stop_ids == (eot,)
    assert _imported(tmp_path).stop_ids == (1,)  # no generation_config.json: the eos token
    with pytest.raises(UserError, match=r"generation_config.json: eos_token_id \[1, 900\] names ids outside"):
        _imported(tmp_path, {"eos_token_id": [1, 900]})


def test_save_and_load_keep_the_hf_files_byte_for_byte(tmp_path):
    tok = _imported(tmp_path, {"eos_token_id": [2, 1], "bos_token_id": 0})
    tok.save(tmp_path / "tok")
    assert (tmp_path / "tok" / "tokenizer.json").read_bytes() == tok.json.encode()
    assert (tmp_path / "tok" / "tokenizer_config.json").read_bytes() == tok.files["tokenizer_config.json"].encode()
    back = load_tokenizer(tmp_path / "tok")
    assert (back.files, back.stop_ids, back.hash, back.add_bos) == (tok.files, (2, 1), tok.hash, tok.add_bos)
    back.save(tmp_path / "again")  # a run's tokenizer/ written from it, as prepare does
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "meta.json"):
        assert (tmp_path / "again" / name).read_bytes() == (tmp_path / "tok" / name).read_bytes(), name


def test_a_changed_or_missing_hf_file_is_refused(tmp_path):
    _imported(tmp_path, {"eos_token_id": 1}).save(tmp_path / "tok")
    (tmp_path / "tok" / "generation_config.json").write_text(json.dumps({"eos_token_id": 2}))
    with pytest.raises(UserError, match="generation_config.json was changed: its sha256 differs"):
        load_tokenizer(tmp_path / "tok")
    (tmp_path / "tok" / "generation_config.json").unlink()
    with pytest.raises(UserError, match="generation_config.json is missing, but meta.json lists it"):
        load_tokenizer(tmp_path / "tok")


def test_llmforge_tokenizers_write_no_file_list(tmp_path):
    tok = build_bpe(c.BPETokenizer(vocab_size=300), run_dir=tmp_path, texts=iter(TEXTS))
    tok.save(tmp_path / "tok")
    assert "files" not in json.loads((tmp_path / "tok" / "meta.json").read_text())
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == ["meta.json", "tokenizer.json"]
    assert load_tokenizer(tmp_path / "tok").stop_ids == (tok.eos_id,)


def test_a_spec_pointing_at_an_hf_folder_keeps_its_files_and_stop_ids(tmp_path):
    # `tokenizer: {name: pretrained, path: <HF folder>}` (specs/models/*.yaml) reads the folder as an import does.
    from llmforge.data.tokenizers import build_pretrained

    folder = tmp_path / "hf"
    _imported(tmp_path, {"eos_token_id": [2, 1]}).save(folder)
    (folder / "meta.json").unlink()  # a plain HF folder: no llmforge meta.json
    tok = build_pretrained(c.PretrainedTokenizer(path=str(folder)), run_dir=tmp_path, texts=iter(()))
    assert tok.stop_ids == (2, 1)
    assert tok.files["generation_config.json"] == (folder / "generation_config.json").read_text()
    assert tok.json == (folder / "tokenizer.json").read_text()
