"""The `dpo` stage: direct preference optimization of the whole model against a frozen reference."""

from __future__ import annotations

import functools
from typing import Any

from llmforge.finetune.checkpoints import AnyCheckpointInit
from llmforge.runtime.context import RunContext


class DPOHooks(AnyCheckpointInit):
    """The whole model trains on the DPO loss against a frozen reference, which the evaluators can score too."""

    def __init__(self, stage, *, reference, pad_id: int) -> None:
        self.stage, self.reference, self.pad_id = stage, reference, pad_id  # reference: a ModelServer

    def step_class(self):
        from llmforge.finetune.steps import PreferenceStep

        return functools.partial(PreferenceStep, reference=self.reference, beta=self.stage.beta, loss=self.stage.loss)

    def evaluation(self, chunks: list, step, server) -> dict[str, Any]:
        from llmforge.runtime.serve import summed_logprobs

        scorer = functools.partial(summed_logprobs, micro_batch_size=self.stage.train.micro_batch_size, pad_id=self.pad_id)
        return {"logprobs": scorer(server), "reference_logprobs": scorer(self.reference)}


def run(stage, *, context: RunContext) -> dict[str, Any]:
    from llmforge.finetune.common import check_layout, frozen_model, preference_packer
    from llmforge.runtime.serve import ModelServer
    from llmforge.runtime.step import autocast
    from llmforge.runtime.training import build_training
    from llmforge.stages.sft import finetune_loaders, sequence_length

    check_layout(context, stage)
    par, tokenizer = context.parallel(), context.tokenizer()
    length = sequence_length(context, stage)
    loader, val_loader, train_recs, val_recs = finetune_loaders(context, stage, preference_packer(tokenizer, stage, length),
                                                                length=length, kind="preferences", what="response (chosen + rejected)")
    reference = ModelServer(frozen_model(context, stage, stage.reference or stage.init_from),
                            autocast=autocast(stage.train.precision, par.device))
    parts = build_training(context, stage, loader=loader, val_loader_fn=val_loader, seq_length=length,
                           hooks=DPOHooks(stage, reference=reference, pad_id=tokenizer.pad_id))
    summary = context.run_loop(stage, parts, evaluate_start=True)
    return {**summary, "train_pairs": len(train_recs), "val_pairs": len(val_recs)}
