"""The `rl` stage: GRPO-style reinforcement learning from reward components.

Each step samples `group_size` completions of its prompts from the current policy (KV-cache
sampler), scores them with the stage's rewards (a rule such as exact match, or a trained
reward model), and makes `updates_per_rollout` updates of the clipped policy-gradient
objective with a KL penalty to the frozen reference. Policy, old and reference log-probs are
taken at the sampling temperature (log softmax of logits / temperature); as in TRL, top_k
and top_p are not applied to them (see `finetune.steps.tempered_logprobs`). A vetoed update
(non-finite, or a spike under on_spike: skip|stop) ends its rollout's updates. `rollout`
rows in metrics.jsonl follow the reward step by step; evaluators (mean_reward, exact_match)
measure held-out prompts, from the starting checkpoint (step 0) on.
"""

from __future__ import annotations

import functools
from typing import Any

from llmforge.finetune.checkpoints import AnyCheckpointInit
from llmforge.runtime.context import RunContext


class RLHooks(AnyCheckpointInit):
    """The whole model trains on the clipped policy-gradient loss; the evaluators get its rewards,
    generation, and log-probabilities of the policy and the frozen reference."""

    def __init__(self, stage, context: RunContext, *, reward, reference, pad_id: int) -> None:
        self.stage, self.context, self.reward, self.reference = stage, context, reward, reference  # reference: a ModelServer or None
        self.pad_id = pad_id

    def step_class(self):
        from llmforge.finetune.steps import PolicyGradientStep

        stage = self.stage
        return functools.partial(PolicyGradientStep, clip_epsilon=stage.clip_epsilon, kl_coef=stage.kl_coef,
                                 updates=stage.updates_per_rollout, temperature=stage.temperature)

    def evaluation(self, chunks: list, step, server) -> dict[str, Any]:
        from llmforge.runtime.serve import summed_logprobs

        scorer = functools.partial(summed_logprobs, micro_batch_size=self.stage.train.micro_batch_size, pad_id=self.pad_id)
        return {"rewards": self.reward, "logprobs": scorer(server),
                "reference_logprobs": scorer(self.reference) if self.reference is not None else None}


from llmforge.spec.errors import UserError


def run(stage, *, context: RunContext) -> dict[str, Any]:
    from megatron.core import parallel_state

    from llmforge.data.sft import SFTLoader, chat_format
    from llmforge.finetune.common import check_layout, frozen_model
    from llmforge.finetune.rewards import build_rewards
    from llmforge.finetune.rollout import RolloutSource
    from llmforge.runtime.serve import ModelServer
    from llmforge.runtime.step import autocast as step_autocast
    from llmforge.runtime.training import build_training
    from llmforge.stages.sft import instruction_packer, load_records, sequence_length, train_val_split

    check_layout(context, stage)
    spec, par, tokenizer, train = context.spec, context.parallel(), context.tokenizer(), stage.train
    length = sequence_length(context, stage)
    template = chat_format(stage.chat_template, tokenizer)
    records, data_files = load_records(context, stage)
    train_recs, val_recs = train_val_split(stage, records, spec.seed)
    if any("prompt" not in r for r in train_recs):
        raise UserError(f"stage {stage.name!r} samples answers to prompts, but its records have no `prompt` field (chat `messages`?)",
                        "use `prompt`/`response` records, e.g. a `tasks` source or an `instructions` source with format: prompt_response")

    autocast = step_autocast(train.precision, par.device)
    reference = ModelServer(frozen_model(context, stage, stage.reference or stage.init_from), autocast=autocast) if stage.kl_coef > 0 else None
    reward = build_rewards(context.registry, stage.rewards, tokenizer=tokenizer, context=context, stage=stage)
    source = RolloutSource([(r, template.prompt_ids(r["prompt"], r.get("system"))) for r in train_recs], tokenizer=tokenizer, reward=reward, group_size=stage.group_size,
                           global_batch_size=train.global_batch_size, micro_batch_size=train.micro_batch_size, dp_rank=par.dp_rank,
                           dp_size=par.dp_size, seed=spec.seed, length=length, scale_rewards=stage.scale_rewards,
                           sampling={"max_new_tokens": stage.max_new_tokens, "temperature": stage.temperature, "top_k": stage.top_k,
                                     "top_p": stage.top_p},
                           need_old_logprobs=stage.updates_per_rollout > 1, reference=reference,
                           dp_group=parallel_state.get_data_parallel_group() if par.dp_size > 1 else None, data_files=data_files)
    # The val split's reference answers give a val loss: how likely the right answer is.
    va_tokens, va_masks, *_ = instruction_packer(tokenizer, stage, length)(val_recs)

    def val_loader() -> SFTLoader:
        # eval_iters global batches in order: the same val examples at any layout.
        return SFTLoader(va_tokens, va_masks, global_batch_size=train.global_batch_size, micro_batch_size=train.micro_batch_size,
                         dp_rank=par.dp_rank, dp_size=par.dp_size, seed=spec.seed, shuffle=False)

    hooks = RLHooks(stage, context, reward=reward, reference=reference, pad_id=tokenizer.pad_id)
    parts = build_training(context, stage, loader=source, val_loader_fn=val_loader if val_recs else None, seq_length=length, hooks=hooks)
    metrics = parts["metrics"]

    def on_rollout(step: int, stats: dict[str, float]) -> None:
        # The loop's count once this step's rollout is in: real input tokens, as in its train rows.
        tokens = parts["loop"].counters.tokens + source.last_batch_tokens
        metrics.write({"kind": "rollout", "stage": stage.name, "step": step, "tokens": tokens, **stats})
        if step % spec.logging.log_interval == 0:
            context.log(f"[{stage.name}] rollout {step}: reward {stats['reward_mean']:.3f} ± {stats['reward_std']:.3f}, "
                        f"{stats['completion_tokens']:.1f} tokens per completion, {stats['uniform_groups']:.0%} groups without signal")

    source.bind(parts["server"], on_rollout)
    context.log(f"[{stage.name}] {len(train_recs)} train / {len(val_recs)} val prompts; {train.global_batch_size // stage.group_size} "
                f"prompts × {stage.group_size} completions per step")
    summary = context.run_loop(stage, parts, evaluate_start=True)
    return {**summary, "train_prompts": len(train_recs), "val_prompts": len(val_recs)}
