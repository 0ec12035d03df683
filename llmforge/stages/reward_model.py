"""The `reward_model` stage: a scalar head on the GPT, trained on preference pairs (Bradley-Terry)."""

from __future__ import annotations

from typing import Any

from llmforge.runtime.context import RunContext


def run(stage, *, context: RunContext) -> dict[str, Any]:
    from llmforge.finetune.common import check_layout, preference_packer
    from llmforge.finetune.reward_model import attach_reward_head, score_sequences
    from llmforge.finetune.rollout import autocast_for
    from llmforge.finetune.steps import RewardModelStep
    from llmforge.models.init import unwrap
    from llmforge.stages.pretrain import build_training
    from llmforge.stages.sft import finetune_loaders, sequence_length

    check_layout(context, stage)
    spec, par, tokenizer = context.spec, context.parallel(), context.tokenizer()
    length = sequence_length(context, stage)
    loader, val_loader, train_recs, val_recs = finetune_loaders(context, stage, preference_packer(tokenizer, stage, length, score_last=True),
                                                                length=length, kind="preferences", what="scored")
    autocast = autocast_for(stage.train.precision, par.device)

    def evaluation(chunks, step) -> dict[str, Any]:
        model = unwrap(chunks[0])
        return {"reward_scores": lambda sequences: score_sequences(model, sequences, micro_batch_size=stage.train.micro_batch_size,
                                                                   pad_id=tokenizer.pad_id, autocast=autocast,
                                                                   max_length=length + 1)}

    parts = build_training(context, stage, loader=loader, val_loader_fn=val_loader, seq_length=length,
                           adapt=lambda chunks: attach_reward_head(chunks, seed=spec.seed), step_cls=RewardModelStep,
                           evaluation=evaluation)
    summary = context.run_loop(stage, parts, evaluate_start=True)
    return {**summary, "train_pairs": len(train_recs), "val_pairs": len(val_recs)}
