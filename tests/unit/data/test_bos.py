"""One BOS rule for every sequence: prepare, SFT examples, every evaluator, the preview, `generate --template raw`.

A sequence starts with BOS when the tokenizer adds one: llmforge's own tokenizers when they
have a bos token; an imported HF tokenizer when its own encoding adds one (as transformers
does by default), checked here against `transformers` itself.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from llmforge.data.sft import chat_format
from llmforge.data.tokenizers import build_bpe, build_byte, build_char, build_pretrained
from llmforge.spec import components as c

TEXTS = ["the cat sat on the mat 1234 times", "the dog sat on 56789 logs", "cats and dogs and mats"] * 50


def _hf_folder(tmp_path, *, adds_bos: bool):
    """An HF tokenizer folder naming `<s>` as bos; its post-processor adds it, or (like Qwen's) adds nothing."""
    from tokenizers import processors

    tok = build_bpe(c.BPETokenizer(vocab_size=300, special_tokens={"bos": "<s>", "eos": "</s>", "pad": "<pad>", "chat_roles": []}),
                    run_dir=tmp_path, texts=iter(TEXTS))
    hf = tok.hf
    if adds_bos:
        hf.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.bos_id)])
    folder = tmp_path / ("bos" if adds_bos else "nobos")
    folder.mkdir()
    (folder / "tokenizer.json").write_text(hf.to_str())
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
                                                              "tokenizer_class": "PreTrainedTokenizerFast"}))
    return folder


@pytest.mark.parametrize("adds_bos", [True, False])
def test_an_imported_tokenizer_adds_bos_as_transformers_does(tmp_path, adds_bos):
    transformers = pytest.importorskip("transformers")
    folder = _hf_folder(tmp_path, adds_bos=adds_bos)
    ours = build_pretrained(c.PretrainedTokenizer(path=str(folder)), run_dir=tmp_path, texts=iter(()))
    theirs = transformers.AutoTokenizer.from_pretrained(str(folder))
    text = "the cat sat"
    assert ours.add_bos is adds_bos
    assert ours.encode_sequence(text) == theirs(text)["input_ids"]  # transformers' default: add_special_tokens=True


def test_llmforge_tokenizers_add_bos_when_they_have_one(tmp_path):
    bpe = build_bpe(c.BPETokenizer(vocab_size=300), run_dir=tmp_path, texts=iter(TEXTS))
    assert bpe.add_bos and bpe.encode_sequence("the") == [bpe.bos_id, *bpe.encode("the")]
    byte = build_byte(c.ByteTokenizer(), run_dir=tmp_path, texts=iter(()))
    assert byte.encode_sequence("ab") == [256, 97, 98]
    no_bos = build_byte(c.ByteTokenizer(special_tokens={"bos": None}), run_dir=tmp_path, texts=iter(()))
    assert not no_bos.add_bos and no_bos.encode_sequence("ab") == [97, 98]
    char = build_char(c.CharTokenizer(), run_dir=tmp_path, texts=iter(["abc"]))
    assert not char.add_bos and char.encode_sequence("ab") == char.encode("ab")


def test_sft_examples_follow_the_rule(tmp_path):
    record = {"prompt": "the cat", "response": " sat"}
    byte = build_byte(c.ByteTokenizer(), run_dir=tmp_path, texts=iter(()))
    assert chat_format("plain", byte).encode(record)[0][0] == byte.bos_id
    # An imported tokenizer that names a bos token but never adds one (Qwen) gets none.
    qwen_like = build_pretrained(c.PretrainedTokenizer(path=str(_hf_folder(tmp_path, adds_bos=False))), run_dir=tmp_path, texts=iter(()))
    assert qwen_like.bos_id is not None
    ids, _ = chat_format("plain", qwen_like).encode(record)
    assert ids[0] != qwen_like.bos_id and ids[: len(qwen_like.encode("the cat"))] == qwen_like.encode("the cat")


def _context(tok, seen: list):
    from llmforge.runtime.evaluate import EvalContext

    def generate(ids, n):
        seen.append(list(ids))
        return [tok.eos_id]

    def score(tokens, masks):
        seen.append(tokens[0][0].tolist())
        return 1.0, 1

    return EvalContext(stage=SimpleNamespace(chat_template="default"), tokenizer=tok, val_loss=lambda n: (0.0, 0), generate=generate,
                       log=lambda m: None, eval_iters=1, score=score, micro_batch_size=1, seq_length=16)


def test_every_evaluator_and_the_preview_start_with_bos(tmp_path):
    from llmforge.runtime.evaluate import ExactMatch, MultipleChoice, SamplePreview

    tok = build_byte(c.ByteTokenizer(), run_dir=tmp_path, texts=iter(()))
    seen: list[list[int]] = []
    ctx = _context(tok, seen)
    items = tmp_path / "mc.jsonl"
    items.write_text(json.dumps({"prompt": "2+2=", "choices": ["4", "5"], "answer": 0}) + "\n")
    MultipleChoice(SimpleNamespace(paths=[str(items)], max_examples=10, normalize=False), context=ctx).evaluate(1)
    SamplePreview(SimpleNamespace(prompts=["once"], max_new_tokens=2), context=ctx).evaluate(1)
    answers = tmp_path / "em.jsonl"
    answers.write_text(json.dumps({"prompt": "2+2=", "response": "4"}) + "\n")
    ExactMatch(SimpleNamespace(tasks=None, paths=[str(answers)], max_examples=10, max_new_tokens=2), context=ctx).evaluate(1)
    ctx.sample("upon", 2, None)  # logging.sample_prompt
    assert len(seen) == 5 and all(ids[0] == tok.bos_id for ids in seen), seen


def test_generate_with_the_raw_template_starts_with_bos(tmp_path):
    from llmforge.interop.generate import TextGenerator

    tok = build_byte(c.ByteTokenizer(), run_dir=tmp_path, texts=iter(()))
    raw = SimpleNamespace(tokenizer=tok, template=None, prefix=[])
    assert TextGenerator.prompt_ids(raw, "hi") == [tok.bos_id, 104, 105]
    qwen_like = build_pretrained(c.PretrainedTokenizer(path=str(_hf_folder(tmp_path, adds_bos=False))), run_dir=tmp_path, texts=iter(()))
    raw = SimpleNamespace(tokenizer=qwen_like, template=None, prefix=[])
    assert TextGenerator.prompt_ids(raw, "the cat") == qwen_like.encode("the cat")



@pytest.mark.parametrize(("template_adds", "add_bos_token"), [(False, True), (True, False)])
def test_add_bos_token_in_tokenizer_config_changes_nothing_as_in_transformers(tmp_path, template_adds, add_bos_token):
    """transformers 5 follows tokenizer.json's post-processor even where tokenizer_config.json says otherwise; so does the rule."""
    from llmforge.data.tokenizers import HFTokenizer

    transformers = pytest.importorskip("transformers")
    folder = _hf_folder(tmp_path, adds_bos=template_adds)
    config_path = folder / "tokenizer_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "add_bos_token": add_bos_token}))
    plain = build_pretrained(c.PretrainedTokenizer(path=str(folder)), run_dir=tmp_path, texts=iter(()))
    ours = HFTokenizer(plain.hf, kind="pretrained", eos="</s>", bos="<s>", pad="<pad>", files={"tokenizer_config.json": config_path.read_text()})
    theirs = transformers.AutoTokenizer.from_pretrained(str(folder))
    assert ours.add_bos is template_adds
    assert ours.encode_sequence("the cat sat") == theirs("the cat sat")["input_ids"]
