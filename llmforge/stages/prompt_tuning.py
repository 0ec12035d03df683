"""The `prompt_tuning` stage: a learned soft prompt in front of a frozen model, trained on instruction data."""

from __future__ import annotations

import random
from typing import Any

from llmforge.runtime.context import RunContext


def run(stage, *, context: RunContext) -> dict[str, Any]:
    from llmforge.finetune.checkpoints import PROMPT_META, PartialCheckpoints, base_reference
    from llmforge.finetune.common import check_layout, logprobs_fn
    from llmforge.finetune.prompt import attach_soft_prompt, is_prompt_key, shift_batch, with_virtual_tokens
    from llmforge.finetune.rollout import autocast_for
    from llmforge.models.init import unwrap
    from llmforge.stages.pretrain import build_training
    from llmforge.stages.sft import finetune_loaders, instruction_packer, sequence_length

    check_layout(context, stage)
    spec, par, opts = context.spec, context.parallel(), stage.prompt_tuning
    tokenizer = context.tokenizer()
    n, placeholder = opts.num_virtual_tokens, tokenizer.pad_id
    length = sequence_length(context, stage, extra=n)
    loader, val_loader, train_recs, val_recs = finetune_loaders(
        context, stage, instruction_packer(tokenizer, stage, length, prefix=[placeholder] * n), length=length)
    if opts.init_text:
        init_ids = tokenizer.encode(opts.init_text)
    else:
        init_ids = random.Random(f"{spec.seed}:soft_prompt").choices(range(tokenizer.vocab_size), k=n)

    def adapt(chunks) -> None:
        attach_soft_prompt(chunks, num_virtual_tokens=n, init=opts.init, token_ids=init_ids, seed=spec.seed)
        context.log(f"[{stage.name}] soft prompt of {n} virtual tokens ({opts.init} init); the model is frozen")

    def evaluation(chunks, step) -> dict[str, Any]:
        # Evaluators see prompts as the data has them: behind the virtual tokens.
        def score(micro_batches, loss_masks):
            shifted = [shift_batch(t, m, n, placeholder) for t, m in zip(micro_batches, loss_masks)]
            return step.eval_loss([t for t, _ in shifted], [m for _, m in shifted])

        return {"generate": lambda ids, k: step.greedy_sample(with_virtual_tokens(ids, n, placeholder), k), "score": score,
                "logprobs": logprobs_fn(unwrap(chunks[0]), micro_batch_size=stage.train.micro_batch_size, pad_id=tokenizer.pad_id,
                                        autocast=autocast_for(stage.train.precision, par.device), prefix=[placeholder] * n)}

    meta = {"base": base_reference(context.final_checkpoint(stage.init_from), context.run.path), "num_virtual_tokens": n,
            "placeholder": placeholder}
    checkpoints = PartialCheckpoints(folder="prompt", select=is_prompt_key, meta_name=PROMPT_META, meta=meta, rank=par.rank)
    parts = build_training(context, stage, loader=loader, val_loader_fn=val_loader, seq_length=length, adapt=adapt,
                           model_io=checkpoints, evaluation=evaluation)
    summary = context.run_loop(stage, parts, evaluate_start=True)
    return {**summary, "train_examples": len(train_recs), "val_examples": len(val_recs)}
