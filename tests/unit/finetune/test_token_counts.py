"""`tokens` of a finetune stage: every real input token the model reads, both sequences of a pair, no padding."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from llmforge.data.sft import chat_format
from llmforge.finetune.common import preference_packer
from llmforge.registry.manager import get_registry, reset_registry
from llmforge.runtime.train import Loop, total_steps
from llmforge.spec.validate import load_and_validate
from llmforge.stages.sft import finetune_loaders

LENGTH = 16  # max_seq_length: the long rejected answer below is cut to it
PAIRS = [{"prompt": "1+1=", "chosen": "2", "rejected": "3"},
         {"prompt": "12+30=", "chosen": "42", "rejected": "402"},
         {"prompt": "5+5=", "chosen": "10", "rejected": "9" * 30},
         {"prompt": "7+", "chosen": "7", "rejected": "77"}]


@pytest.fixture(scope="module")
def tokenizer():
    from llmforge.data.tokenizers import build_byte
    from llmforge.spec.components import ByteTokenizer

    return build_byte(ByteTokenizer.model_validate({}), run_dir=Path("."), texts=[])


class _Context:
    """What finetune_loaders uses of a RunContext, on one process."""

    def __init__(self, spec, tokenizer):
        self.spec, self.registry, self._tokenizer = spec, get_registry(), tokenizer

    def log(self, message: str) -> None:
        pass

    def tokenizer(self):
        return self._tokenizer

    def parallel(self):
        return SimpleNamespace(dp_rank=0, dp_size=1)


def _stage(tmp_path: Path, tokenizer, stage_type: str):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    train = {"micro_batch_size": 2, "global_batch_size": len(PAIRS), "max_steps": 2}  # one step reads every pair once
    spec = {"name": "ft", "tokenizer": {"name": "byte"},
            "model": {"name": "gpt", "num_layers": 2, "hidden_size": 32, "num_attention_heads": 2, "vocab_size": 320, "seq_length": 32},
            "stages": [{"name": "base", "type": "sft", "data": {"sources": {"pairs": {"name": "instructions", "paths": [str(data)]}}},
                        "train": train},
                       {"name": "pairs", "type": stage_type, "init_from": "base", "max_seq_length": LENGTH, "evaluators": [],
                        "data": {"sources": {"pairs": {"name": "preferences", "paths": [str(data)]}}, "val_fraction": 0.0},
                        "train": train}]}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    reset_registry()
    loaded = load_and_validate(str(path))[0]
    return _Context(loaded, tokenizer), loaded.stages[1]


def _real_input_tokens(tokenizer, *, reads: int) -> int:
    """Both sequences of every pair: each sequence's tokens, at most the `reads` the step takes in."""
    template = chat_format("default", tokenizer)
    lengths = [len(template.encode({"prompt": r["prompt"], "response": r[key]})[0])
               for r in PAIRS for key in ("chosen", "rejected")]
    assert max(lengths) > LENGTH + 1 > min(lengths)  # one sequence is truncated, the others padded
    return sum(min(n, reads) for n in lengths)


def _train_rows(loader, stage) -> list[dict]:
    """The train rows of two steps of the stage's Loop over `loader`, as build_training sets it up."""
    rows: list[dict] = []
    loop = Loop(stage=stage.name, train=stage.train, total=2, step_fn=lambda batch, lr: SimpleNamespace(loss=0.7, grad_norm=1.0, nonfinite=False),
                loader=loader, schedule=lambda step: 1e-3, evaluate=None, metrics=SimpleNamespace(write=rows.append), log=lambda m: None,
                ckpt=SimpleNamespace(save=lambda step, write, state: Path("unsaved")), checkpoint_interval=None, save_model=None,
                load_model=None, rng=SimpleNamespace(seed=1), tokens_per_step=stage.train.global_batch_size * LENGTH, flops_per_token=0.0,
                peak_flops=0.0, rank=0, memory_fn=lambda: 0.0, log_interval=1)
    loop.run()
    return rows


# DPO reads the first L tokens of each sequence (its targets are the next ones); the reward
# model reads all L + 1, since it scores the last token.
@pytest.mark.parametrize("stage_type, reads", [("dpo", LENGTH), ("reward_model", LENGTH + 1)])
def test_a_pair_stage_counts_both_sequences_real_input_tokens(tmp_path, tokenizer, stage_type, reads):
    ctx, stage = _stage(tmp_path, tokenizer, stage_type)
    pack = preference_packer(tokenizer, stage, LENGTH, score_last=stage_type == "reward_model")
    loader = finetune_loaders(ctx, stage, pack, length=LENGTH, kind="preferences")[0]
    per_step = _real_input_tokens(tokenizer, reads=reads)
    assert [r["tokens"] for r in _train_rows(loader, stage)] == [per_step, 2 * per_step]
    # A token budget counts the same tokens: one more than a step reads takes a second step.
    train = stage.train.model_copy(update={"max_steps": None, "max_tokens": per_step + 1})
    assert total_steps(train, samples_per_epoch=loader.samples_per_epoch, tokens_per_sample=loader.tokens_per_sample, loader=loader) == 2


def test_an_rl_rollout_counts_prompt_and_completion_tokens(monkeypatch):

    import torch

    from llmforge.finetune.rollout import RolloutSource

    length, eos, pad = 8, 1, 1  # the pad id is EOS: padding cannot be told from ids
    prompts = [({"prompt": "a"}, [5, 6, 7]), ({"prompt": "b"}, [5, 6])]
    completions = {3: [[9, eos], [9, 9, 9, 9, 9, eos]], 2: [[eos], [9, 9, 9]]}  # by prompt length: 5, 9 (cut to 8), 3, 5 tokens

    class Policy:  # a ModelServer's face: completions by prompt length
        device = torch.device("cpu")

        def generate(self, prompt_ids, **kwargs):
            return [completions[len(ids)][i % 2] for i, ids in enumerate(prompt_ids)]
    tokenizer = SimpleNamespace(eos_id=eos, pad_id=pad, vocab_size=16, decode=lambda ids: "x")
    source = RolloutSource(prompts, tokenizer=tokenizer, reward=lambda samples: ([0.0] * len(samples), {}), group_size=2,
                           global_batch_size=4, micro_batch_size=2, dp_rank=0, dp_size=1, seed=0, length=length,
                           sampling={"max_new_tokens": 6, "temperature": 1.0, "top_k": None, "top_p": 1.0}, scale_rewards=False,
                           need_old_logprobs=False, reference=None)
    source.bind(Policy(), lambda step, stats: None)
    source.next_global_batch()
    assert source.last_batch_tokens == 5 + 8 + 3 + 5
