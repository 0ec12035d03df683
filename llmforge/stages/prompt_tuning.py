"""The `prompt_tuning` stage: a learned soft prompt in front of a frozen model, trained on instruction data."""

from __future__ import annotations

import random
from typing import Any

from llmforge.finetune.checkpoints import PartialCheckpoints
from llmforge.runtime.context import RunContext


class PromptTuningHooks(PartialCheckpoints):
    """A soft prompt in front of the frozen model: attached after init, checkpointed alone, and put in
    front of every prompt the evaluators score or continue."""

    def __init__(self, stage, context: RunContext, *, meta: dict[str, Any], init_ids: list[int]) -> None:
        from llmforge.finetune.checkpoints import PROMPT_META
        from llmforge.finetune.prompt import is_prompt_key

        super().__init__(folder="prompt", select=is_prompt_key, meta_name=PROMPT_META, meta=meta, rank=context.parallel().rank)
        self.stage, self.context, self.init_ids = stage, context, init_ids
        self.n, self.placeholder = meta["num_virtual_tokens"], meta["placeholder"]

    def adapt(self, chunks: list) -> None:
        from llmforge.finetune.prompt import attach_soft_prompt

        opts = self.stage.prompt_tuning
        attach_soft_prompt(chunks, num_virtual_tokens=self.n, init=opts.init, token_ids=self.init_ids, seed=self.context.spec.seed)
        self.context.log(f"[{self.stage.name}] soft prompt of {self.n} virtual tokens ({opts.init} init); the model is frozen")

    def evaluation(self, chunks: list, step, server) -> dict[str, Any]:
        from llmforge.finetune.prompt import shift_batch
        from llmforge.runtime.serve import greedy_functions, summed_logprobs

        n, placeholder, tokenizer = self.n, self.placeholder, self.context.tokenizer()
        prefix = [placeholder] * n

        # Evaluators see prompts as the data has them: behind the virtual tokens.
        def score(micro_batches, loss_masks):
            shifted = [shift_batch(t, m, n, placeholder) for t, m in zip(micro_batches, loss_masks)]
            return step.eval_loss([t for t, _ in shifted], [m for _, m in shifted])

        return {**greedy_functions(server, tokenizer, prefix=prefix), "score": score,
                "logprobs": summed_logprobs(server, micro_batch_size=self.stage.train.micro_batch_size, pad_id=tokenizer.pad_id, prefix=prefix)}


def run(stage, *, context: RunContext) -> dict[str, Any]:
    from llmforge.finetune.checkpoints import base_reference
    from llmforge.finetune.common import check_layout
    from llmforge.runtime.training import build_training
    from llmforge.stages.sft import finetune_loaders, instruction_packer, sequence_length

    check_layout(context, stage)
    spec, opts = context.spec, stage.prompt_tuning
    tokenizer = context.tokenizer()
    n, placeholder = opts.num_virtual_tokens, tokenizer.pad_id
    length = sequence_length(context, stage, extra=n)
    loader, val_loader, train_recs, val_recs = finetune_loaders(
        context, stage, instruction_packer(tokenizer, stage, length, prefix=[placeholder] * n), length=length)
    if opts.init_text:
        init_ids = tokenizer.encode(opts.init_text)
    else:
        init_ids = random.Random(f"{spec.seed}:soft_prompt").choices(range(tokenizer.vocab_size), k=n)

    meta = {"base": base_reference(context.final_checkpoint(stage.init_from), context.run.path), "num_virtual_tokens": n,
            "placeholder": placeholder}
    hooks = PromptTuningHooks(stage, context, meta=meta, init_ids=init_ids)
    parts = build_training(context, stage, loader=loader, val_loader_fn=val_loader, seq_length=length, hooks=hooks)
    summary = context.run_loop(stage, parts, evaluate_start=True)
    return {**summary, "train_examples": len(train_recs), "val_examples": len(val_recs)}
