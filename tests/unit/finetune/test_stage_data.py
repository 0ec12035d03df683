"""A finetune stage's data as the stage reads it: filters, the val split, and what a resume checks."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from llmforge.finetune.common import preference_packer
from llmforge.registry.manager import get_registry, reset_registry
from llmforge.spec.errors import UserError
from llmforge.spec.validate import load_and_validate
from llmforge.stages.sft import finetune_loaders, instruction_packer, load_records

TRAIN = {"micro_batch_size": 2, "global_batch_size": 2, "max_steps": 2}


@pytest.fixture(scope="module")
def tokenizer():
    from llmforge.data.tokenizers import build_byte
    from llmforge.spec.components import ByteTokenizer

    return build_byte(ByteTokenizer.model_validate({}), run_dir=Path("."), texts=[])


class _Context:
    """What the stage's data functions use of a RunContext: the spec, sources, the log, one process."""

    def __init__(self, spec, tokenizer):
        self.spec, self.registry, self._tokenizer, self.logs = spec, get_registry(), tokenizer, []

    def log(self, message: str) -> None:
        self.logs.append(message)

    def tokenizer(self):
        return self._tokenizer

    def parallel(self):
        return SimpleNamespace(dp_rank=0, dp_size=1)


def _write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _context(tmp_path: Path, tokenizer, sources: dict, **stage) -> _Context:
    spec = {"name": "ft", "tokenizer": {"name": "byte"},
            "model": {"name": "gpt", "num_layers": 2, "hidden_size": 32, "num_attention_heads": 2, "vocab_size": 320, "seq_length": 32},
            "stages": [{"name": "sft", "type": "sft", "data": {"sources": sources, **stage.pop("data", {})}, "train": TRAIN, **stage}]}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    reset_registry()
    return _Context(load_and_validate(str(path))[0], tokenizer)


def _loaders(ctx: _Context):
    stage = ctx.spec.stages[0]
    return finetune_loaders(ctx, stage, instruction_packer(ctx.tokenizer(), stage, 24), length=24)


ADDITIONS = [{"prompt": f"{i}+{i}=", "response": str(2 * i)} for i in range(8)]


def test_without_a_val_split_no_training_example_is_evaluated(tmp_path, tokenizer):
    _write(tmp_path / "add.jsonl", ADDITIONS)
    ctx = _context(tmp_path, tokenizer, {"add": {"name": "instructions", "paths": [str(tmp_path / "add.jsonl")]}},
                   data={"val_fraction": 0.0}, evaluators=[])
    loader, val_loader, train_recs, val_recs = _loaders(ctx)
    assert val_loader is None and val_recs == []  # build_training then skips val reading and the preview
    assert train_recs == ADDITIONS and loader.samples_per_epoch == len(ADDITIONS)


def test_an_empty_val_split_is_refused_when_val_loss_reads_it(tmp_path, tokenizer):
    _write(tmp_path / "one.jsonl", ADDITIONS[:1])  # one record: a val_fraction of 0.5 still leaves no val example
    ctx = _context(tmp_path, tokenizer, {"one": {"name": "instructions", "paths": [str(tmp_path / "one.jsonl")]}},
                   data={"val_fraction": 0.5})
    with pytest.raises(UserError) as info:
        _loaders(ctx)
    assert "stage 'sft'" in str(info.value) and "val_loss" in str(info.value) and "val split is empty" in str(info.value)
    assert "data.val_fraction" in info.value.hint and "evaluators" in info.value.hint


def test_resume_refuses_an_edited_jsonl_and_names_it(tmp_path, tokenizer):
    first, second = _write(tmp_path / "a.jsonl", ADDITIONS[:4]), _write(tmp_path / "b.jsonl", ADDITIONS[4:])
    sources = {"add": {"name": "instructions", "paths": [str(tmp_path / "*.jsonl")]}}
    loader = _loaders(_context(tmp_path, tokenizer, sources))[0]
    loader.next_global_batch()
    state = json.loads(json.dumps(loader.state_dict()))  # as trainer_state.json holds it

    resumed = _loaders(_context(tmp_path, tokenizer, sources))[0]
    resumed.load_state_dict(state)
    assert resumed.position == loader.position
    second.write_text(second.read_text() + "\n")  # a blank line changes no record: still the same data
    _loaders(_context(tmp_path, tokenizer, sources))[0].load_state_dict(state)

    _write(second, [*ADDITIONS[4:7], {"prompt": "7+7=", "response": "15"}])
    edited = _loaders(_context(tmp_path, tokenizer, sources))[0]
    with pytest.raises(UserError) as info:
        edited.load_state_dict(state)
    assert str(second) in str(info.value) and str(first) not in str(info.value)
    assert info.value.hint == "restore the file, or start the stage afresh in a new run dir"


def test_filters_apply_to_finetune_records_and_are_counted(tmp_path, tokenizer):
    pairs = [{"prompt": "ab", "response": "c"},  # 3 characters: too short
             {"prompt": "ab", "response": "cd"},
             {"prompt": "ab", "response": "cd"},  # a duplicate record
             {"prompt": "abc", "response": "d"},  # the same text, but another record: kept
             {"prompt": "a" * 10, "response": "b" * 11}]  # 21 characters: too long
    chats = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "y"}]},  # roles are not text
             {"messages": [{"role": "user", "content": "hey"}, {"role": "assistant", "content": "yo"}]}]
    prefs = [{"prompt": "1+1=", "chosen": "2", "rejected": "3"}, {"prompt": "1", "chosen": "1", "rejected": "1"}]
    filters = {"min_chars": 4, "max_chars": 20, "dedup": True}
    no_val = {"data": {"val_fraction": 0.0}, "evaluators": []}
    ctx = _context(tmp_path, tokenizer, {
        "pairs": {"name": "instructions", "paths": [str(_write(tmp_path / "pairs.jsonl", pairs))], "filters": filters},
        "chats": {"name": "instructions", "format": "messages", "paths": [str(_write(tmp_path / "chats.jsonl", chats))], "filters": filters},
    }, **no_val)
    assert _loaders(ctx)[2] == [pairs[1], pairs[3], chats[1]]
    assert "[sft] source pairs: 2 of 5 records kept (1 too short, 1 too long, 1 duplicate)" in ctx.logs
    assert "[sft] source chats: 1 of 2 records kept (1 too short)" in ctx.logs

    base = tmp_path / "base" / "checkpoints" / "sft" / "step-1"  # a dpo stage starts from a checkpoint
    base.mkdir(parents=True)
    ctx = _context(tmp_path, tokenizer, {
        "prefs": {"name": "preferences", "paths": [str(_write(tmp_path / "prefs.jsonl", prefs))], "filters": filters}},
        type="dpo", init_from=str(base), **no_val)
    stage = ctx.spec.stages[0]
    assert finetune_loaders(ctx, stage, preference_packer(tokenizer, stage, 24), length=24)[2] == prefs[:1]
    assert "[sft] source prefs: 1 of 2 records kept (1 too short)" in ctx.logs


def test_a_source_filtered_empty_is_refused_with_its_counts(tmp_path, tokenizer):
    ctx = _context(tmp_path, tokenizer, {"add": {"name": "instructions", "paths": [str(_write(tmp_path / "add.jsonl", ADDITIONS))],
                                                 "filters": {"min_chars": 100}}})
    with pytest.raises(UserError, match=r"stages.sft.data.sources.add is empty after filtering: 8 records \(8 too short\)"):
        load_records(ctx, ctx.spec.stages[0])
