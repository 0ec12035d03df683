"""The `sft` stage: supervised finetuning with the loss on response tokens only."""

from __future__ import annotations

from typing import Any

import numpy as np

from llmforge.runtime.context import RunContext
from llmforge.spec.errors import UserError


def load_records(context: RunContext, stage, *, kind: str = "instructions") -> list[dict[str, Any]]:
    """All records of the stage's data sources, in source order."""
    from llmforge.data.errors import ErrorPolicy
    from llmforge.data.sources import SourceContext

    errors = ErrorPolicy(context.spec.data.on_error, log=context.log)
    records: list[dict[str, Any]] = []
    for name, opts in stage.data.sources.items():
        src_ctx = SourceContext(name=f"stages.{stage.name}.data.sources.{name}", errors=errors, tokenizer=context.tokenizer())
        for doc in context.registry.build("source", opts, context=src_ctx):
            if not isinstance(doc.content, dict):
                raise UserError(f"source {name!r} ({opts.name}) yields plain documents, but a {stage.type} stage needs {kind} records",
                                "use an `instructions`, `preferences` or `tasks` source")
            records.append(doc.content)
    if not records:
        raise UserError(f"stage {stage.name!r}: its data sources hold no records", "check the paths and filters")
    return records


def split_records(records: list, val_fraction: float, seed: int) -> tuple[list, list]:
    """A seeded split: the same records go to val on every run and every rank."""
    order = np.random.default_rng([seed, 0x5F7]).permutation(len(records))
    n_val = int(round(len(records) * val_fraction))
    if val_fraction > 0 and n_val == 0 and len(records) > 1:
        n_val = 1
    val = [records[i] for i in sorted(order[:n_val])]
    train = [records[i] for i in sorted(order[n_val:])]
    return train, val


def run(stage, *, context: RunContext) -> dict[str, Any]:
    from llmforge.data.sft import SFTLoader, encode_example, pack_examples, template_parts
    from llmforge.stages.pretrain import build_training

    spec, par = context.spec, context.parallel()
    train_cfg = stage.train
    length = stage.max_seq_length or spec.model.seq_length
    if length > spec.model.max_positions:
        raise UserError(f"stages.{stage.name}.max_seq_length {length} exceeds the model's {spec.model.max_positions} positions",
                        "lower max_seq_length")
    tokenizer = context.tokenizer()
    parts = template_parts(stage.chat_template)
    train_recs, val_recs = split_records(load_records(context, stage), stage.data.val_fraction, spec.seed)
    if not val_recs:
        val_recs = train_recs[: max(1, train_cfg.micro_batch_size)]

    def encode(recs):
        tokens, masks, truncated = pack_examples([encode_example(tokenizer, parts, r) for r in recs], length, tokenizer.pad_id)
        if tokens.max() >= spec.model.vocab_size:
            raise UserError(f"a token id {int(tokens.max())} is ≥ model.vocab_size {spec.model.vocab_size}", "raise model.vocab_size")
        return tokens, masks, truncated

    tr_tokens, tr_masks, truncated = encode(train_recs)
    va_tokens, va_masks, _ = encode(val_recs)
    if truncated:
        context.log(f"[{stage.name}] warning: {truncated} example(s) longer than {length} tokens were truncated")
    context.log(f"[{stage.name}] {len(train_recs)} train / {len(val_recs)} val examples, {length} tokens each, "
                f"{int(tr_masks.sum()):,} response tokens")
    loader = SFTLoader(tr_tokens, tr_masks, global_batch_size=train_cfg.global_batch_size, micro_batch_size=train_cfg.micro_batch_size,
                       dp_rank=par.dp_rank, dp_size=par.dp_size, seed=spec.seed)
    val_batch = train_cfg.micro_batch_size * par.dp_size

    def val_loader():
        return SFTLoader(va_tokens, va_masks, global_batch_size=val_batch, micro_batch_size=train_cfg.micro_batch_size,
                         dp_rank=par.dp_rank, dp_size=par.dp_size, seed=spec.seed, shuffle=False)

    parts_ = build_training(context, stage, loader=loader, val_loader_fn=val_loader, seq_length=length)
    summary = context.run_loop(stage, parts_)
    return {**summary, "train_examples": len(train_recs), "val_examples": len(val_recs)}
