"""The RL stage's loader: each global batch is a fresh rollout of the current policy.

A step takes the next prompts (a seeded permutation per epoch, each DP rank a fixed slice,
as the finetune loader orders examples), samples `group_size` completions of each with the
KV-cache sampler (`runtime.serve.ModelServer`, replica-local: each DP replica samples its own
prompts with its TP/PP ranks), scores them with the reward components and turns the rewards
into group-normalized advantages. Its state is the global position and the prompts' file
identity (a resume refuses edited data): each completion draws from a generator seeded by
(seed, step, its index in the global batch), so a resumed run samples what it would have, and
a run samples the same completions at any DP size.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from llmforge.data.order import GlobalOrder
from llmforge.data.sft import DataFiles, MaskedBatch, check_data_files
from llmforge.finetune.losses import group_advantages
from llmforge.finetune.rewards import Sample
from llmforge.finetune.steps import Rollout
from llmforge.runtime.serve import stop_ids_of
from llmforge.spec.errors import UserError

ROLLOUT_STATE_VERSION = 2  # 2: the prompts' file identity (`data_files`)


def _seed(*parts: int) -> int:
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "little")


class RolloutSource:
    """Prompts → sampled, rewarded rollouts in the micro batches PolicyGradientStep takes.

    Args:
        prompts: (record, prompt ids) per training prompt, chat template applied.
        reward: samples → (rewards, mean per component), see `build_rewards`.
        sampling: generate()'s keyword arguments (max_new_tokens, temperature, top_k, top_p).
        need_old_logprobs: the step makes several updates per rollout, so the sampling
            policy's log-probs are kept (the first update's ratio is 1 without them).
            They, and the reference's, are taken at the sampling temperature.
        reference: a `ModelServer` over the frozen reference model when the KL penalty is on, else None.
        dp_group: the data-parallel process group (statistics are averaged over it), or None.
        data_files: the input files' identity from `load_records`, checked on resume.
    """

    def __init__(self, prompts: list[tuple[dict[str, Any], list[int]]], *, tokenizer, reward: Callable, group_size: int,
                 global_batch_size: int, micro_batch_size: int, dp_rank: int, dp_size: int, seed: int, length: int,
                 sampling: dict[str, Any], scale_rewards: bool, need_old_logprobs: bool, reference,
                 dp_group=None, data_files: DataFiles | None = None):
        per_rank = global_batch_size // dp_size
        if global_batch_size % dp_size or per_rank % group_size or per_rank % micro_batch_size:
            raise UserError(f"global_batch_size {global_batch_size} must give each of {dp_size} data-parallel rank(s) whole groups of "
                            f"{group_size} and whole micro batches of {micro_batch_size}",
                            f"use a multiple of {dp_size * group_size * micro_batch_size // np.gcd(group_size, micro_batch_size)}")
        longest = max(len(ids) for _, ids in prompts)
        if longest + sampling["max_new_tokens"] > length + 1:
            raise UserError(f"a prompt of {longest} tokens plus max_new_tokens {sampling['max_new_tokens']} exceeds max_seq_length {length} + 1",
                            "raise max_seq_length or lower max_new_tokens")
        self.prompts, self.tokenizer, self.reward = prompts, tokenizer, reward
        self.group_size, self.global_batch_size, self.micro_batch_size = group_size, global_batch_size, micro_batch_size
        self.dp_rank, self.dp_size, self.dp_group, self.seed, self.length = dp_rank, dp_size, dp_group, seed, length
        self.sampling, self.scale_rewards, self.need_old_logprobs = sampling, scale_rewards, need_old_logprobs
        self.reference, self.data_files = reference, data_files or {}
        self.samples_per_epoch = len(prompts) * group_size
        self.tokens_per_sample = length
        self.position = 0  # completions consumed, over all ranks
        self.last_batch_tokens = 0  # real input tokens (prompt + completion) of the last rollout, over every DP rank
        self.policy = None
        self.on_rollout: Callable[[int, dict[str, float]], None] = lambda step, stats: None
        self._order = GlobalOrder(len(prompts), seed=seed, salt=0x0F7)

    def bind(self, policy, on_rollout: Callable[[int, dict[str, float]], None]) -> None:
        """The policy's `ModelServer` (built after the loader) and where each rollout's statistics go."""
        self.policy, self.on_rollout = policy, on_rollout

    def next_global_batch(self) -> MaskedBatch:
        step = self.position // self.global_batch_size
        per_rank = self.global_batch_size // self.dp_size // self.group_size
        first = self.position // self.group_size + self.dp_rank * per_rank
        chosen = [self.prompts[self._order.index(i)] for i in range(first, first + per_rank)]
        self.position += self.global_batch_size
        records = [rec for rec, _ in chosen for _ in range(self.group_size)]
        prompt_ids = [ids for _, ids in chosen for _ in range(self.group_size)]
        tok = self.tokenizer
        completions = self.policy.generate(prompt_ids, stop_ids=stop_ids_of(tok), pad_id=tok.pad_id, vocab_size=tok.vocab_size,
                                           seed=_seed(self.seed, step), first_row=self.dp_rank * len(prompt_ids), shared=False,
                                           **self.sampling)
        stops = set(stop_ids_of(tok))
        samples = [Sample(rec, tok.decode([t for t in out if t not in stops]), ids, out)
                   for rec, ids, out in zip(records, prompt_ids, completions)]
        rewards, component_means = self.reward(samples)
        rewards = torch.tensor(rewards, dtype=torch.float32)
        advantages = group_advantages(rewards, self.group_size, scale=self.scale_rewards)

        tokens = torch.full((len(samples), self.length + 1), tok.pad_id, dtype=torch.long)
        masks = torch.zeros(len(samples), self.length)
        for row, sample in enumerate(samples):
            ids = sample.prompt_ids + sample.completion_ids
            tokens[row, : len(ids)] = torch.tensor(ids)
            masks[row, len(sample.prompt_ids) - 1: len(ids) - 1] = 1.0  # targets that are completion tokens
        # The model reads the first `length` tokens of each row; counted from the samples, since the pad id may be EOS.
        input_tokens = sum(min(len(s.prompt_ids) + len(s.completion_ids), self.length) for s in samples)
        # At the sampling temperature, as the step scores the policy (see steps.tempered_logprobs).
        def score(server):
            return server.logprobs(tokens, micro_batch_size=self.micro_batch_size, temperature=self.sampling["temperature"], shared=False)

        old = score(self.policy) if self.need_old_logprobs else None
        ref = score(self.reference) if self.reference is not None else None

        groups = rewards.reshape(-1, self.group_size)
        stats = {"reward_mean": float(rewards.mean()), "reward_std": float(rewards.std(unbiased=False)),
                 "completion_tokens": float(masks.sum(1).mean()),
                 "uniform_groups": float((groups.max(1).values == groups.min(1).values).float().mean()),
                 **{f"reward/{name}": value for name, value in component_means.items()}}
        # Every rank scores the same number of samples: the statistics average over DP, the tokens add up.
        summed = self._dp_sum({**stats, "input_tokens": float(input_tokens)})
        self.last_batch_tokens = int(summed.pop("input_tokens"))
        self.on_rollout(step + 1, {k: v / self.dp_size for k, v in summed.items()})

        n = len(samples) // self.micro_batch_size
        pieces = lambda t: [None] * n if t is None else list(t.chunk(n))  # noqa: E731
        rollouts = [Rollout(m, a, o, r) for m, a, o, r in zip(masks.chunk(n), advantages.chunk(n), pieces(old), pieces(ref))]
        return MaskedBatch(list(tokens.chunk(n)), rollouts)

    def _dp_sum(self, values: dict[str, float]) -> dict[str, float]:
        """`values` summed over the DP ranks, in one all-reduce on the policy's device (NCCL takes device tensors)."""
        if self.dp_size == 1:
            return values
        import torch.distributed as dist

        keys = sorted(values)
        summed = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=self.policy.device)
        dist.all_reduce(summed, group=self.dp_group)
        return dict(zip(keys, summed.tolist()))

    def steps_for_tokens(self, max_tokens: int) -> int:
        """A token budget cannot size RL: its tokens (prompt + completion) are known only once sampled."""
        raise UserError(f"an rl stage cannot run to max_tokens {max_tokens}: its tokens are known only once its completions are sampled",
                        "give the rl stage max_steps or max_epochs")

    def state_dict(self) -> dict[str, Any]:
        return {"version": ROLLOUT_STATE_VERSION, "position": self.position, "seed": self.seed, "data_files": self.data_files}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") not in (1, ROLLOUT_STATE_VERSION):
            raise UserError(f"rollout state version {state.get('version')} is not {ROLLOUT_STATE_VERSION}")
        check_data_files(state.get("data_files"), self.data_files)
        self.position = int(state["position"])
