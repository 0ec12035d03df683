"""The `reward_model` stage: a scalar head on the GPT, trained on preference pairs (Bradley-Terry)."""

from __future__ import annotations

from typing import Any

from llmforge.finetune.checkpoints import AnyCheckpointInit
from llmforge.runtime.context import RunContext


class RewardModelHooks(AnyCheckpointInit):
    """A scalar head on the GPT, trained with the Bradley-Terry loss; the evaluators can score whole sequences."""

    def __init__(self, stage, context: RunContext, *, length: int) -> None:
        self.stage, self.context, self.length = stage, context, length

    def adapt(self, chunks: list) -> None:
        from llmforge.finetune.reward_model import attach_reward_head

        attach_reward_head(chunks, seed=self.context.spec.seed)

    def step_class(self):
        from llmforge.finetune.steps import RewardModelStep

        return RewardModelStep

    def evaluation(self, chunks: list, step, server) -> dict[str, Any]:
        from llmforge.finetune.reward_model import score_sequences

        train, pad_id = self.stage.train, self.context.tokenizer().pad_id
        return {"reward_scores": lambda sequences: score_sequences(server, sequences, micro_batch_size=train.micro_batch_size,
                                                                   pad_id=pad_id, max_length=self.length + 1)}


def run(stage, *, context: RunContext) -> dict[str, Any]:
    from llmforge.finetune.common import check_layout, preference_packer
    from llmforge.runtime.training import build_training
    from llmforge.stages.sft import finetune_loaders, sequence_length

    check_layout(context, stage)
    tokenizer = context.tokenizer()
    length = sequence_length(context, stage)
    loader, val_loader, train_recs, val_recs = finetune_loaders(context, stage, preference_packer(tokenizer, stage, length, score_last=True),
                                                                length=length, kind="preferences", what="scored")
    parts = build_training(context, stage, loader=loader, val_loader_fn=val_loader, seq_length=length,
                           hooks=RewardModelHooks(stage, context, length=length))
    summary = context.run_loop(stage, parts, evaluate_start=True)
    return {**summary, "train_pairs": len(train_recs), "val_pairs": len(val_recs)}
