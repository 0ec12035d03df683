"""`extends` layers that choose another component replace it whole; the same component still merges."""

from __future__ import annotations

from llmforge.spec.load import load_spec


def test_a_layer_naming_another_tokenizer_replaces_the_base_one(write_spec):
    write_spec("tokenizer:\n  name: bpe\n  vocab_size: 32000\n  train_max_mb: 64\n", "base.yaml")
    write_spec("tokenizer:\n  name: pretrained\n  path: /models/x\n", "models/x.yaml")
    loaded = load_spec(write_spec("extends: [base.yaml, models/x.yaml]\n"))
    assert loaded.data["tokenizer"] == {"name": "pretrained", "path": "/models/x"}
    # The base's keys are gone with their positions: no error can point at base.yaml's vocab_size.
    assert not any(p[:1] == ("tokenizer",) and loc.startswith("base.yaml") for p, loc in loaded.locations.items())
    assert loaded.locations[("tokenizer", "path")] == "models/x.yaml:3:3"


def test_the_same_component_still_merges_key_by_key(write_spec):
    write_spec("model:\n  name: gpt\n  num_layers: 2\n  seq_length: 64\n", "base.yaml")
    loaded = load_spec(write_spec("extends: base.yaml\nmodel:\n  name: gpt\n  num_layers: 8\n"))
    assert loaded.data["model"] == {"name": "gpt", "num_layers": 8, "seq_length": 64}
    assert loaded.locations[("model", "seq_length")] == "base.yaml:4:3"


def test_a_layer_without_a_name_merges_into_whatever_the_base_chose(write_spec):
    write_spec("tokenizer: {name: bpe, vocab_size: 32000}\n", "base.yaml")
    loaded = load_spec(write_spec("extends: base.yaml\ntokenizer: {vocab_size: 4096}\n"))
    assert loaded.data["tokenizer"] == {"name": "bpe", "vocab_size": 4096}


def test_a_nested_component_switch_replaces_only_that_component(write_spec):
    write_spec("data:\n  sources:\n    web: {name: jsonl, paths: [a.jsonl], fields: [text]}\n    code: {name: text, paths: [b]}\n"
               "  shard_size_mb: 4\n", "base.yaml")
    loaded = load_spec(write_spec("extends: base.yaml\ndata:\n  sources:\n    web: {name: text, paths: [c.txt]}\n"))
    assert loaded.data["data"] == {"sources": {"web": {"name": "text", "paths": ["c.txt"]}, "code": {"name": "text", "paths": ["b"]}},
                                   "shard_size_mb": 4}


def test_the_spec_itself_replaces_what_its_bases_chose(write_spec):
    write_spec("tokenizer: {name: bpe, vocab_size: 32000}\n", "base.yaml")
    loaded = load_spec(write_spec("extends: base.yaml\ntokenizer: {name: byte}\n"))
    assert loaded.data["tokenizer"] == {"name": "byte"}
