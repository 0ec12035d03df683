"""Pieces the finetune stage runners share: layout checks, the frozen reference model, preference packing."""

from __future__ import annotations

import torch

from llmforge.spec.errors import UserError


def check_layout(context, stage) -> None:
    """Refuse, at run time too, a layout the stage's step cannot run (validate says the same)."""
    from llmforge.spec.stages import layout_problems

    problems = layout_problems(stage, context.spec.parallelism, model=context.spec.model)
    if problems:
        raise UserError(f"stage {stage.name!r}: " + "; ".join(problems), "change parallelism, or run this stage from a spec of its own")


def frozen_model(context, stage, reference: str) -> list[torch.nn.Module]:
    """Frozen chunks of the model from `reference`'s final checkpoint, in the run's layout (eval mode).

    Serve them with `runtime.serve.ModelServer`, which runs them at any layout."""
    from llmforge.finetune.checkpoints import load_weights

    spec = context.spec
    chunks = context.registry.build("model", spec.model, parallelism=spec.parallelism, precision=stage.train.precision, seed=spec.seed)
    source = context.final_checkpoint(reference)
    load_weights(source, chunks)
    for chunk in chunks:
        chunk.eval().requires_grad_(False)
    context.log(f"[{stage.name}] frozen reference model from {source}")
    return chunks


def preference_packer(tokenizer, stage, length: int, *, score_last: bool = False):
    """records → `Packed`, one pair per row: chosen then rejected tokens ([n, 2 (L + 1)]) and masks ([n, 2 L]).

    The masks mark the response tokens (DPO's log-likelihoods), or with `score_last` only the
    last token of each sequence (in target coordinates, as the response masks: mask[j] is
    token j + 1), where a reward model reads its score. A row's input tokens are both
    sequences' real tokens as the step reads them: the first L of each for DPO, all L + 1 of
    each for the reward model (it scores the last token).
    """
    import numpy as np

    from llmforge.data.sft import Packed, chat_format, pack_examples

    template = chat_format(stage.chat_template, tokenizer)

    def pack(records):
        missing = next((r for r in records if not {"prompt", "chosen", "rejected"} <= set(r)), None)
        if missing is not None:
            raise UserError(f"stage {stage.name!r} trains on preference pairs, but a record has only {sorted(missing)}",
                            "use a `preferences` source, or a `tasks` source with format: preferences")
        halves = []
        truncated = 0
        inputs = np.zeros(len(records), dtype=np.int64)
        for key in ("chosen", "rejected"):
            # The prompt as the user turn and each answer as the assistant turn, masked as SFT masks it.
            encoded = [template.encode({"prompt": r["prompt"], "response": r[key]}) for r in records]
            tokens, masks, cut, read = pack_examples(encoded, length, tokenizer.pad_id)
            if score_last:
                masks = np.zeros_like(masks)
                masks[np.arange(len(encoded)), [min(len(ids), length + 1) - 2 for ids, _ in encoded]] = 1.0
                read = np.array([min(len(ids), length + 1) for ids, _ in encoded], dtype=np.int64)
            halves.append((tokens, masks))
            truncated += cut
            inputs += read
        (tc, mc), (tr, mr) = halves
        return Packed(np.concatenate([tc, tr], axis=1), np.concatenate([mc, mr], axis=1), truncated, inputs)

    return pack

