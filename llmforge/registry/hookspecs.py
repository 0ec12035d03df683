"""Every llmforge hook. Each returns a list of `Component`s; the registry flattens them.

A plugin implements any of these with `@llmforge.plugin.hookimpl` and exposes the
module (or object) under the `llmforge` entry-point group. Built-ins do exactly the same
(`llmforge.builtins`). A factory is called as `factory(options, **runtime)`; each kind's
Protocol is in `llmforge.registry.protocols` (exported by `llmforge.plugin`).
`docs/plugins.md` documents each hook; a test keeps them in step.
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("llmforge")


@hookspec
def register_tokenizers() -> list:
    """Tokenizers, chosen by `tokenizer.name`. Factory: `(options, *, run_dir, texts) -> Tokenizer`."""


@hookspec
def register_sources() -> list:
    """Data sources, chosen by `data.sources.<id>.name`. Factory: `(options, *, context: SourceContext) -> iterable of Document`."""


@hookspec
def register_models() -> list:
    """Model architectures, chosen by `model.name`. Factory: `(options, *, parallelism, precision, seed) -> model chunks`."""


@hookspec
def register_optimizers() -> list:
    """Optimizers, chosen by `train.optimizer.name`. Factory: `(options, *, params) -> torch.optim.Optimizer`."""


@hookspec
def register_lr_schedules() -> list:
    """Learning-rate schedules, chosen by `train.lr_schedule.name`. Factory: `(options, *, peak_lr, total_steps) -> step -> lr` (step from 0)."""


@hookspec
def register_stage_types() -> list:
    """Stage types, chosen by `stages[i].type`. Factory: `(options, *, context: RunContext) -> summary` runs the stage.

    Private in plugin API v1: `RunContext` is llmforge's internal object.
    """


@hookspec
def register_evaluators() -> list:
    """Evaluators, listed in a stage's `evaluators`, run every `eval_interval` steps and at the stage's end.

    Factory: `(options, *, context: EvalContext) -> evaluator`, where `evaluator.evaluate(step: int) -> dict[str, float]`
    returns metrics that go into the eval row of metrics.jsonl and TensorBoard. Every rank
    evaluates (the model calls are collectives); rank 0's result is written. The Component may
    declare `needs` (what the stage must offer) and `metrics` (its keys). The model is reached
    only through `context`, which offers:

    - `context.val_batches(n)`: the val split's first n global batches (`tokens`, `loss_mask`),
      whole on every rank; `context.token_logprobs(rows)` and `context.predictions(rows)`: the
      log-prob of each next token and the most likely one, at any layout;

    - `context.val_loss(iters: int) -> tuple[float, int]`: mean loss per token (nats) over
      `iters` val batches, and the number of tokens it covers;
    - `context.tokenizer`: `encode(text) -> list[int]` and `decode(ids) -> str`;
    - `context.generate(prompt_ids: list[int], max_new_tokens: int) -> list[int]`: greedy
      continuation of the prompt, the new token ids only, ending after EOS (kept) if emitted;
      `context.generate_many(prompts, max_new_tokens)` batches many; both work at every layout
      (every rank calls them with the same prompts and gets the whole answer);
    - `context.server`: the stage's `runtime.serve.ModelServer` (log-probs, seeded sampling);
    - `context.log(msg: str)`: a line on the console and in the run log;
    - finetune stages add, where they have them (None otherwise; the evaluator then returns {}):
      `context.logprobs(examples) -> list[float]`, the summed log-probability of each
      `(ids, mask)` example's masked ids, and `context.reference_logprobs` the same under the
      frozen reference model (dpo, rl); `context.reward_scores(sequences) -> list[float]`, a
      reward model's scores (reward_model); `context.rewards(samples) -> (rewards, means)`,
      the RL stage's reward components (see `register_rewards`).
    """


@hookspec
def register_callbacks() -> list:
    """Training callbacks and loggers, listed in `logging.callbacks`.

    Factory: `(options, *, run_dir: pathlib.Path, spec, stage) -> callback`, built per stage
    (`spec` and `stage`: copies of the resolved spec and the stage's options), where
    `callback.on_log(row: MetricsRow) -> None` is called for every metrics row, train and eval,
    with the same keys metrics.jsonl gets; and the optional
    `callback.on_stage_end(stage: str, summary: dict) -> None` once when any stage finishes,
    prepare included. Callbacks run in the process that writes metrics.jsonl (rank 0).
    """


@hookspec
def register_rewards() -> list:
    """Reward components, listed in an RL stage's `rewards` and summed with their `weight`s.

    Factory: `(options, *, tokenizer, context, stage) -> reward`, where
    `reward(samples) -> list[float]` scores each `llmforge.finetune.rewards.Sample`: its
    `record` (the prompt's data record: `prompt`, and `response` for task data), `completion`
    (the sampled text), and `prompt_ids` / `completion_ids` as the policy saw them. `context`
    is the run (a reward model finds its checkpoint through `context.final_checkpoint`). The
    options model should extend `llmforge.spec.components.RewardBase` (it has `weight`).
    Under tensor parallelism every rank of a TP group calls it with the same samples.
    """
