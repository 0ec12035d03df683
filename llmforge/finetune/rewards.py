"""Reward components for the RL stage, registered through `register_rewards` like any plugin's.

A component's factory is `(options, *, tokenizer, context, stage) -> reward`, and
`reward(samples) -> list[float]` scores a list of `Sample`s. The stage sums the
components' rewards with their weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from llmforge.spec.errors import UserError


@dataclass(frozen=True)
class Sample:
    """One completion to score.

    Args:
        record: the prompt's data record (`prompt`, and `response` for task data).
        completion: the sampled text, without the end-of-sequence token.
        prompt_ids, completion_ids: the tokens as the policy saw them (chat template
            included; completion_ids end with EOS when the policy stopped on its own).
    """

    record: dict[str, Any]
    completion: str
    prompt_ids: list[int]
    completion_ids: list[int]


class ExactMatchReward:
    """1.0 when the stripped completion equals the record's reference answer, else 0.0."""

    def __init__(self, options, *, tokenizer=None, context=None, stage=None):
        self.field = options.field

    def __call__(self, samples: list[Sample]) -> list[float]:
        out = []
        for sample in samples:
            if self.field not in sample.record:
                raise UserError(f"the exact_match reward needs a {self.field!r} field in every record; this one has {sorted(sample.record)}",
                                "use a `tasks` or `instructions` source with reference answers, or set the reward's `field`")
            out.append(float(sample.completion.strip() == str(sample.record[self.field]).strip()))
        return out


class DigitMatchReward(ExactMatchReward):
    """Partial credit: the fraction of the reference answer's characters the completion gets right, in place.

    Characters are compared position by position from the left; the longer of the two
    strings sets the denominator, so extra or missing characters cost too. An exact answer
    scores 1. Denser than exact match, it gives most GRPO groups some signal.
    """

    def __call__(self, samples: list[Sample]) -> list[float]:
        exact = super().__call__(samples)  # checks the field is there
        out = []
        for sample, hit in zip(samples, exact):
            got, want = sample.completion.strip(), str(sample.record[self.field]).strip()
            width = max(len(got), len(want), 1)
            out.append(1.0 if hit else sum(a == b for a, b in zip(got, want)) / width)
        return out


class RewardModelReward:
    """The score of a model trained by a `reward_model` stage, on the prompt and completion tokens.

    The reward model reads the same chat template the RL stage uses, ending at an EOS (added
    when the completion was cut off), as it read its preference pairs in training.
    """

    def __init__(self, options, *, tokenizer, context, stage):
        from megatron.core import dist_checkpointing

        from llmforge.finetune.reward_model import HEAD, attach_reward_head
        from llmforge.runtime.sharded_io import load_sharded

        spec = context.spec
        step_dir = context.final_checkpoint(options.stage)
        model_dir = step_dir / "model"
        saved = dist_checkpointing.load_tensors_metadata(str(model_dir)) if model_dir.is_dir() else {}
        if f"{HEAD}.weight" not in saved:
            raise UserError(f"reward {options.stage!r}: {step_dir} is not a reward model's checkpoint (no {HEAD})",
                            "name a reward_model stage, or a checkpoint it wrote")
        import torch

        from llmforge.runtime.serve import ModelServer

        # Read as saved, without autocast: bf16 weights (megatron's bf16) in bf16, others in fp32.
        precision = "bf16" if saved[f"{HEAD}.weight"].dtype == torch.bfloat16 else "fp32"
        chunks = context.registry.build("model", spec.model, parallelism=spec.parallelism, precision=precision, seed=spec.seed)
        attach_reward_head(chunks, seed=spec.seed)
        load_sharded(model_dir, chunks, None)
        for chunk in chunks:
            chunk.eval().requires_grad_(False)
        self.server = ModelServer(chunks)  # at the run's layout
        self.eos_id, self.pad_id = tokenizer.eos_id, tokenizer.pad_id
        self.micro_batch_size = stage.train.micro_batch_size
        # Score no more tokens than the reward model was trained on (its stage's max_seq_length + 1).
        trained = next((s for s in spec.stages if s.name == options.stage), None)
        self.max_length = (trained.max_seq_length or spec.model.seq_length) + 1 if trained is not None else None
        context.log(f"[{stage.name}] reward model from {step_dir}")

    def __call__(self, samples: list[Sample]) -> list[float]:
        from llmforge.finetune.reward_model import score_sequences

        sequences = []
        for s in samples:
            ids = list(s.completion_ids)
            if not ids or ids[-1] != self.eos_id:
                ids.append(self.eos_id)
            sequences.append(list(s.prompt_ids) + ids)
        # Replica-local: each data-parallel replica scores its own rollouts.
        return score_sequences(self.server, sequences, micro_batch_size=self.micro_batch_size, pad_id=self.pad_id,
                               max_length=self.max_length, shared=False)


def build_rewards(registry, options_list, *, tokenizer, context, stage) -> Callable[[list[Sample]], tuple[list[float], dict[str, float]]]:
    """The stage's reward: samples → (weighted sum per sample, mean of each component)."""
    components = [(opts, registry.build("reward", opts, tokenizer=tokenizer, context=context, stage=stage)) for opts in options_list]

    def reward(samples: list[Sample]) -> tuple[list[float], dict[str, float]]:
        total = [0.0] * len(samples)
        means = {}
        for opts, component in components:
            values = component(samples)
            if len(values) != len(samples):
                raise RuntimeError(f"reward {opts.name!r} returned {len(values)} values for {len(samples)} samples")
            means[opts.name] = sum(values) / max(len(values), 1)
            total = [t + opts.weight * v for t, v in zip(total, values)]
        return total, means

    return reward
