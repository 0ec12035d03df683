"""The `sft` stage: supervised finetuning with the loss on response tokens only."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from llmforge.runtime.context import RunContext
from llmforge.spec.errors import UserError

if TYPE_CHECKING:
    from llmforge.data.sft import DataFiles


def load_records(context: RunContext, stage, *, kind: str = "instructions") -> tuple[list[dict[str, Any]], DataFiles]:
    """The records of the stage's data sources in source order, filtered and counted as prepare does,
    and the digest of the records each input file yielded (what a resume checks the data against)."""
    from llmforge.data.errors import ErrorPolicy
    from llmforge.data.filters import FilterCounts, filtered
    from llmforge.data.sft import RecordDigests
    from llmforge.data.sources import SourceContext

    records: list[dict[str, Any]] = []
    data_files: DataFiles = {}
    for name, opts in stage.data.sources.items():
        where = f"stages.{stage.name}.data.sources.{name}"
        errors, digests, counts = ErrorPolicy(context.spec.data.on_error, log=context.log), RecordDigests(), FilterCounts()
        docs = context.registry.build("source", opts, context=SourceContext(name=where, errors=errors, tokenizer=context.tokenizer()))
        for doc in filtered(digests.tap(_records_only(docs, name, opts, stage, kind)), getattr(opts, "filters", None), counts):
            records.append(doc.content)
        counts.skipped_errors = errors.skipped
        dropped = f" ({counts.dropped()})" if counts.dropped() else ""
        if counts.kept == 0:
            raise UserError(f"{where} is empty after filtering: {counts.documents} records{dropped}",
                            "loosen the source's filters or check its paths")
        context.log(f"[{stage.name}] source {name}: {counts.kept} of {counts.documents} records kept{dropped}")
        data_files[name] = digests.hexdigests()
    return records, data_files


def _records_only(docs, name: str, opts, stage, kind: str):
    """The source's documents, refusing plain text: a finetune stage trains on records."""
    for doc in docs:
        if not isinstance(doc.content, dict):
            raise UserError(f"source {name!r} ({opts.name}) yields plain documents, but a {stage.type} stage needs {kind} records",
                            "use an `instructions`, `preferences` or `tasks` source")
        yield doc


def split_records(records: list, val_fraction: float, seed: int) -> tuple[list, list]:
    """A seeded split: the same records go to val on every run and every rank."""
    order = np.random.default_rng([seed, 0x5F7]).permutation(len(records))
    n_val = int(round(len(records) * val_fraction))
    if val_fraction > 0 and n_val == 0 and len(records) > 1:
        n_val = 1
    val = [records[i] for i in sorted(order[:n_val])]
    train = [records[i] for i in sorted(order[n_val:])]
    return train, val


def train_val_split(stage, records: list, seed: int) -> tuple[list, list]:
    """The stage's (train, val) records. An empty val split stays empty: evaluating on training
    examples would flatter the model. It is refused when an evaluator reads it (validate refuses
    val_fraction 0; this catches a split that rounds to nothing, e.g. of one record)."""
    from llmforge.spec.stages import val_split_readers

    train, val = split_records(records, stage.data.val_fraction, seed)
    readers = val_split_readers(stage)
    if not val and readers:
        raise UserError(f"stage {stage.name!r}: its val split is empty ({len(records)} record(s), data.val_fraction "
                        f"{stage.data.val_fraction:g}), but its {', '.join(readers)} evaluator reads it",
                        "add records or raise data.val_fraction so that at least one is held out, or list only evaluators "
                        "with their own data (`evaluators: []` for none)")
    return train, val


def sequence_length(context: RunContext, stage, extra: int = 0) -> int:
    """Tokens per finetune example: max_seq_length (else model.seq_length) plus `extra` virtual ones."""
    spec = context.spec
    length = (stage.max_seq_length or spec.model.seq_length) + extra
    if length > spec.model.max_positions:
        raise UserError(f"stages.{stage.name}.max_seq_length {length - extra}" + (f" + {extra} virtual tokens" if extra else "")
                        + f" exceeds the model's {spec.model.max_positions} positions", "lower max_seq_length")
    return length


def finetune_loaders(context: RunContext, stage, pack, *, length: int, kind: str = "instructions", what: str = "response"):
    """(train loader, val loader factory or None without val records, train records, val records) of a finetune stage's data.

    Args:
        pack: records → `Packed` (tokens [n, ...], loss masks [n, ...], truncated count, real
            input tokens per row), e.g. padded SFT examples, or a preference pair per row.
    """
    from llmforge.data.sft import SFTLoader

    spec, par, train_cfg = context.spec, context.parallel(), stage.train
    records, data_files = load_records(context, stage, kind=kind)
    train_recs, val_recs = train_val_split(stage, records, spec.seed)

    def encode(recs):
        packed = pack(recs)
        if packed.tokens.max() >= spec.model.vocab_size:
            raise UserError(f"a token id {int(packed.tokens.max())} is ≥ model.vocab_size {spec.model.vocab_size}", "raise model.vocab_size")
        return packed

    train_set = encode(train_recs)
    if train_set.truncated:
        context.log(f"[{stage.name}] warning: {train_set.truncated} example(s) longer than {length} tokens were truncated")
    preflight(context, stage, train_set, what=what)
    rows = f" packed into {len(train_set.tokens)} rows of" if getattr(train_set, "segments", None) is not None else ""
    context.log(f"[{stage.name}] {len(train_recs)} train / {len(val_recs)} val examples,{rows} {length} tokens each, "
                f"{int(train_set.masks.sum()):,} {what} tokens")
    # Counted from the examples' true lengths: tokens, tokens/s and max_tokens are real input tokens.
    loader = SFTLoader(train_set.tokens, train_set.masks, global_batch_size=train_cfg.global_batch_size,
                       micro_batch_size=train_cfg.micro_batch_size, dp_rank=par.dp_rank, dp_size=par.dp_size, seed=spec.seed,
                       data_files=data_files, input_tokens=train_set.input_tokens, segments=getattr(train_set, "segments", None))
    if not val_recs:
        return loader, None, train_recs, val_recs
    val_set = encode(val_recs)
    val_batch = train_cfg.global_batch_size  # eval_iters global batches in order: the same val examples at any layout

    def val_loader():
        return SFTLoader(val_set.tokens, val_set.masks, global_batch_size=val_batch, micro_batch_size=train_cfg.micro_batch_size,
                         dp_rank=par.dp_rank, dp_size=par.dp_size, seed=spec.seed, shuffle=False, segments=getattr(val_set, "segments", None))

    return loader, val_loader, train_recs, val_recs


PREVIEW_EXAMPLES = 3


def preflight(context: RunContext, stage, packed, *, what: str) -> None:
    """Log the first examples as the model reads them, trained spans in [[ ]], and refuse a set where nothing trains.

    An all-zeros mask trains nothing and an all-ones one trains the prompts too; both are the
    silent failures of chat-template SFT, so the examples are shown before the first step.
    """
    from llmforge.data.sft import marked_text

    tokenizer = context.tokenizer()
    for n in range(min(PREVIEW_EXAMPLES, len(packed.tokens))):
        for ids, mask in _sequences(packed.tokens[n], packed.masks[n], tokenizer.pad_id):
            text = marked_text(tokenizer, ids, mask).replace("\n", "\\n")
            context.log(f"[{stage.name}] example {n + 1} ({what} tokens in [[ ]]): {text}")
    if not packed.masks.any():
        raise UserError(f"stage {stage.name!r}: no example has a token that trains (every loss mask of its {what} tokens is all zeros)",
                        "see the examples logged above: raise max_seq_length if the prompts fill it, or check the records and the chat_template")


def _sequences(tokens, masks, pad_id: int | None):
    """(ids, mask per id) of each sequence in a packed row (one, or a preference pair side by side), without trailing padding."""
    per_row = len(tokens) - len(masks)  # each sequence is L + 1 tokens with L target masks
    length = len(masks) // per_row
    for k in range(per_row):
        ids = [int(t) for t in tokens[k * (length + 1):(k + 1) * (length + 1)]]
        mask = [0] + [int(m) for m in masks[k * length:(k + 1) * length]]  # mask[j] marks token j + 1
        while ids and ids[-1] == pad_id and not mask[-1]:
            ids.pop()
            mask.pop()
        yield ids, mask


def instruction_packer(tokenizer, stage, length: int, *, prefix: list[int] = ()):
    """records → padded SFT examples through the stage's chat template (behind `prefix`, never trained on);
    several to a row with `packing: true`."""
    from llmforge.data.sft import chat_format, pack_documents, pack_examples

    template = chat_format(stage.chat_template, tokenizer, train_on_turns=getattr(stage, "train_on_turns", "all"))

    def encode(record):
        ids, mask = template.encode(record)
        return [*prefix, *ids], [0] * len(prefix) + mask

    pack = pack_documents if getattr(stage, "packing", False) else pack_examples
    return lambda recs: pack([encode(r) for r in recs], length, tokenizer.pad_id)


def run(stage, *, context: RunContext) -> dict[str, Any]:
    from llmforge.finetune.checkpoints import AnyCheckpointInit
    from llmforge.runtime.documents import PACKED_EXAMPLES, with_documents
    from llmforge.runtime.training import build_training

    length = sequence_length(context, stage)
    loader, val_loader, train_recs, val_recs = finetune_loaders(context, stage, instruction_packer(context.tokenizer(), stage, length),
                                                                length=length)
    parts_ = build_training(context, stage, loader=loader, val_loader_fn=val_loader, seq_length=length,
                            hooks=with_documents(AnyCheckpointInit(), PACKED_EXAMPLES if stage.packing else None))
    summary = context.run_loop(stage, parts_)
    return {**summary, "train_examples": len(train_recs), "val_examples": len(val_recs)}
