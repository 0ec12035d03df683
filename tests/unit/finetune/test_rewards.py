"""Reward components: the built-in rule, a plugin's reward through the registry, and how the RL stage sums them."""

from __future__ import annotations

import pytest
from pydantic import Field

from llmforge.finetune.rewards import ExactMatchReward, Sample, build_rewards
from llmforge.registry import Component, hookimpl
from llmforge.registry.manager import build_registry
from llmforge.spec.components import ExactMatchReward as ExactMatchOptions
from llmforge.spec.components import RewardBase
from llmforge.spec.errors import UserError


def _sample(completion: str, **record) -> Sample:
    return Sample({"prompt": "12+30=", **record}, completion, [1, 2, 3], [4, 5])


def test_exact_match_reward_compares_the_stripped_answer():
    reward = ExactMatchReward(ExactMatchOptions())
    samples = [_sample("42", response="42"), _sample(" 42\n", response="42"), _sample("43", response="42"), _sample("", response="42"),
               _sample("olleh", response="olleh")]
    assert reward(samples) == [1.0, 1.0, 0.0, 0.0, 1.0]


def test_exact_match_reward_reads_the_field_it_is_given():
    reward = ExactMatchReward(ExactMatchOptions(field="answer"))
    assert reward([_sample("7", answer="7", response="8")]) == [1.0]
    with pytest.raises(UserError, match="'answer' field"):
        reward([_sample("7", response="7")])


class LengthPenalty(RewardBase):
    """−per_char × the completion's length (a throwaway plugin reward)."""

    per_char: float = Field(0.5, description="Penalty per character.")


class LengthPenaltyPlugin:
    @hookimpl
    def register_rewards(self) -> list[Component]:
        return [Component("length_penalty", LengthPenalty, lambda options, **_: lambda samples: [-options.per_char * len(s.completion)
                                                                                                   for s in samples])]


def test_rewards_sum_with_weights_and_report_each_component():
    registry = build_registry([(LengthPenaltyPlugin(), "llmforge-length", "0.1")])
    assert registry.get("reward", "length_penalty").provider == "llmforge-length"
    options = [registry.get("reward", "exact_match").typed_options(name="exact_match", weight=2.0),
               registry.get("reward", "length_penalty").typed_options(name="length_penalty", per_char=0.25)]
    reward = build_rewards(registry, options, tokenizer=None, context=None, stage=None)
    totals, means = reward([_sample("42", response="42"), _sample("4200", response="42")])
    assert totals == [2.0 - 0.5, 0.0 - 1.0]
    assert means == {"exact_match": 0.5, "length_penalty": -0.75}


def test_a_reward_returning_the_wrong_count_is_caught():
    class Broken:
        @hookimpl
        def register_rewards(self) -> list[Component]:
            return [Component("broken", RewardBase, lambda options, **_: lambda samples: [1.0])]

    registry = build_registry([(Broken(), "broken-dist", "0.0")])
    reward = build_rewards(registry, [registry.get("reward", "broken").typed_options(name="broken")], tokenizer=None, context=None, stage=None)
    with pytest.raises(RuntimeError, match="1 values for 2 samples"):
        reward([_sample("1"), _sample("2")])


def test_the_rl_stage_validates_its_rewards_by_name():
    from llmforge.spec.validate import spec_model

    registry = build_registry()
    stage = {"name": "rl", "type": "rl", "init_from": "sft", "data": {"sources": {"a": {"name": "tasks"}}},
             "train": {"micro_batch_size": 4, "global_batch_size": 8, "max_steps": 1}, "rewards": [{"name": "exact_mach"}]}
    spec = {"name": "t", "tokenizer": {"name": "byte"}, "model": {"name": "gpt", "num_layers": 1, "hidden_size": 8, "num_attention_heads": 1,
                                                                    "vocab_size": 300, "seq_length": 16},
            "stages": [{"name": "sft", "type": "sft", "data": {"sources": {"a": {"name": "tasks"}}},
                        "train": {"micro_batch_size": 4, "global_batch_size": 8, "max_steps": 1}}, stage]}
    with pytest.raises(Exception, match="exact_mach"):
        spec_model(registry).model_validate(spec)
    stage["rewards"] = [{"name": "exact_match", "weight": 0.5}, {"name": "reward_model", "stage": "rm"}]
    validated = spec_model(registry).model_validate(spec)
    assert [r.name for r in validated.stages[1].rewards] == ["exact_match", "reward_model"]
    assert validated.stages[1].rewards[0].weight == 0.5


def test_digit_match_gives_partial_credit_in_place():
    from llmforge.finetune.rewards import DigitMatchReward

    reward = DigitMatchReward(ExactMatchOptions())
    samples = [_sample("81", response="81"), _sample("84", response="81"), _sample("18", response="81"), _sample("811", response="81"),
               _sample("1", response="81"), _sample("", response="81"), _sample(" 81 ", response="81")]
    assert reward(samples) == pytest.approx([1.0, 0.5, 0.0, 2 / 3, 0.0, 0.0, 1.0])


def test_preference_stages_refuse_instruction_records():
    from llmforge.finetune.common import preference_packer

    class Stage:
        name, chat_template = "dpo", "default"

    with pytest.raises(UserError, match="preference pairs"):
        preference_packer(None, Stage(), 12)([{"prompt": "1+1=", "response": "2"}])
