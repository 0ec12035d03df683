"""Evaluators of the preference and RL stages: margins and win rates, reward-model accuracy, mean reward.

Each reaches the model only through the EvalContext's finetune fields. Its options model
declares what it `needs`, each stage what it `offers`, and validate refuses an evaluator in a
stage that lacks it (a `pairwise_accuracy` listed in an SFT stage, say); the `{}` returns
below only guard a plugin stage that declares more than its hooks give.
"""

from __future__ import annotations

from typing import Any

from llmforge.runtime.evaluate import EvalContext, _read_jsonl


def _template(context: EvalContext):
    from llmforge.data.sft import chat_format

    return chat_format(getattr(context.stage, "chat_template", "default"), context.tokenizer)


def _pairs(options) -> list[dict[str, Any]]:
    from llmforge.data import tasks

    if options.tasks is not None:
        t = options.tasks
        records = tasks.preferences(list(t.tasks), t.num_examples, t.seed, t.split)
    else:
        records = _read_jsonl(options.paths, ("prompt", "chosen", "rejected"))
    return records[: options.max_examples]


def _encoded_pairs(options, context: EvalContext) -> tuple[list, list]:
    """The held-out pairs in the stage's template: (chosen, rejected) lists of (ids, response mask)."""
    template = _template(context)
    chosen, rejected = [], []
    for rec in _pairs(options):
        chosen.append(template.encode({"prompt": rec["prompt"], "response": rec["chosen"]}))
        rejected.append(template.encode({"prompt": rec["prompt"], "response": rec["rejected"]}))
    return chosen, rejected


def _mean(values: list[float]) -> float:
    return sum(values) / max(len(values), 1)


class Preference:
    """Chosen-over-rejected log-likelihood margin and win rate (policy, and reference when there is one)."""

    def __init__(self, options, *, context: EvalContext):
        self.context = context
        self.chosen, self.rejected = _encoded_pairs(options, context)

    def _margins(self, logprobs) -> tuple[list[float], list[float], list[float]]:
        scores = logprobs(self.chosen + self.rejected)
        chosen, rejected = scores[: len(self.chosen)], scores[len(self.chosen):]
        return [c - r for c, r in zip(chosen, rejected)], chosen, rejected

    def evaluate(self, step: int) -> dict[str, float]:
        ctx = self.context
        if ctx.logprobs is None:
            return {}
        margins, chosen, rejected = self._margins(ctx.logprobs)
        out = {"pref_margin": _mean(margins), "pref_win_rate": _mean([float(m > 0) for m in margins])}
        if ctx.reference_logprobs is not None:
            ref_margins, _, _ = self._margins(ctx.reference_logprobs)
            out.update({"ref_pref_margin": _mean(ref_margins), "ref_pref_win_rate": _mean([float(m > 0) for m in ref_margins])})
            beta = getattr(ctx.stage, "beta", None)
            if beta is not None:
                # DPO's implicit reward: β (log π − log π_ref), chosen minus rejected.
                rewards = [beta * (m - r) for m, r in zip(margins, ref_margins)]
                out.update({"dpo_reward_margin": _mean(rewards), "dpo_reward_accuracy": _mean([float(r > 0) for r in rewards])})
        return out


class PairwiseAccuracy:
    """How often the reward model scores chosen above rejected, and by how much on average."""

    def __init__(self, options, *, context: EvalContext):
        self.context = context
        chosen, rejected = _encoded_pairs(options, context)
        self.chosen, self.rejected = [ids for ids, _ in chosen], [ids for ids, _ in rejected]  # the reward model scores whole sequences

    def evaluate(self, step: int) -> dict[str, float]:
        if self.context.reward_scores is None:
            return {}
        scores = self.context.reward_scores(self.chosen + self.rejected)
        n = len(self.chosen)
        margins = [c - r for c, r in zip(scores[:n], scores[n:])]
        return {"rm_accuracy": _mean([float(m > 0) for m in margins]), "rm_margin": _mean(margins)}


class MeanReward:
    """Mean reward of greedy completions of held-out prompts, by the RL stage's reward components."""

    def __init__(self, options, *, context: EvalContext):
        from llmforge.runtime.evaluate import ExactMatch

        self.options, self.context = options, context
        self._prompts = ExactMatch(options, context=context)  # the same records and prompt encoding

    def evaluate(self, step: int) -> dict[str, float]:
        from llmforge.finetune.rewards import Sample

        ctx = self.context
        if ctx.rewards is None:
            return {}
        samples = []
        for rec in self._prompts.records:
            prompt_ids = self._prompts._prompt_ids(rec)
            out = ctx.generate(prompt_ids, self.options.max_new_tokens)
            if out is None:
                return {}
            eos = ctx.tokenizer.eos_id
            completion = out[: out.index(eos) + 1] if eos in out else out
            text = ctx.tokenizer.decode([t for t in completion if t != eos])
            samples.append(Sample(rec, text, prompt_ids, completion))
        rewards, means = ctx.rewards(samples)
        return {"mean_reward": _mean(rewards), **{f"mean_reward/{name}": value for name, value in means.items()}}
