"""`sample_diversity`: distinct-n of greedy continuations, a cheap detector of repetition loops."""

from __future__ import annotations

from typing import Any

from llmforge.plugin import EvalContext

from llmforge_lion.options import SampleDiversityOptions


def distinct_n(sequences: list[list[Any]], n: int) -> float:
    """Unique n-grams / all n-grams over every sequence (corpus-level, as in Li et al. 2016).

    Sequences shorter than n contribute nothing; with no n-gram at all the score is 0,
    since an empty continuation is as degenerate as a loop.
    """
    grams = [tuple(seq[i : i + n]) for seq in sequences for i in range(len(seq) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


class SampleDiversity:
    def __init__(self, options: SampleDiversityOptions, context: EvalContext):
        self.options = options
        self.context = context

    def _units(self, ids: list[int]) -> list[Any]:
        if self.options.unit == "word":
            return self.context.tokenizer.decode(ids).split()
        return list(ids)

    def evaluate(self, step: int) -> dict[str, float]:
        ctx, opts = self.context, self.options
        samples = [ctx.generate(ctx.tokenizer.encode(prompt), opts.max_new_tokens) for prompt in opts.prompts]
        units = [self._units(ids) for ids in samples]
        metrics = {f"distinct_{n}": distinct_n(units, n) for n in opts.ngram_orders}
        metrics["sample_length"] = sum(len(ids) for ids in samples) / len(samples)
        ctx.log(f"step {step}: sample diversity " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
        return metrics


def build_sample_diversity(options: SampleDiversityOptions, *, context: EvalContext) -> SampleDiversity:
    """Factory for the `sample_diversity` evaluator (`llmforge.plugin.EvaluatorFactory`)."""
    return SampleDiversity(options, context)
