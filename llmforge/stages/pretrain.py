"""The `pretrain` stage: next-token training on the prepared shards."""

from __future__ import annotations

import sys
from typing import Any

from llmforge.runtime.context import RunContext
from llmforge.spec.errors import UserError


def run(stage, *, context: RunContext) -> dict[str, Any]:
    from llmforge.data.loader import TokenLoader
    from llmforge.data.manifest import read_manifest
    from llmforge.finetune.checkpoints import AnyCheckpointInit
    from llmforge.runtime.documents import pretraining_documents, with_documents
    from llmforge.runtime.training import build_training

    spec, par = context.spec, context.parallel()
    data_dir = context.run.data
    if not (data_dir / "manifest.json").exists():
        raise UserError(f"stage {stage.name!r} needs prepared shards in {data_dir}, but there are none",
                        "put a `prepare` stage before it in `stages`")
    train = stage.train

    def data_log(message: str) -> None:
        # Each rank reads its own samples: rank 0's skips go to the run log, the others' to stderr.
        if par.rank == 0:
            context.log(message)
        else:
            print(f"[rank {par.rank}] {message}", file=sys.stderr, flush=True)

    def loader(split: str, shuffle: bool, global_batch: int) -> TokenLoader:
        return TokenLoader(data_dir, split, global_batch_size=global_batch, micro_batch_size=train.micro_batch_size,
                           dp_rank=par.dp_rank, dp_size=par.dp_size, seed=spec.seed, shuffle=shuffle,
                           on_error=spec.data.on_error, vocab_size=spec.model.vocab_size, log=data_log)

    train_loader = loader("train", True, train.global_batch_size)
    # val_loss reads eval_iters global batches of the val split in order: the same samples at any layout.
    has_val = read_manifest(data_dir)["splits"].get("val", {}).get("samples", 0) > 0
    val_loader = (lambda: loader("val", False, train.global_batch_size)) if has_val else None
    # init_from may name any checkpoint that stands for model weights (a LoRA one is merged on load).
    # Packed documents that do not see each other (data.reset_*): the step splits each window at EOD.
    documents = pretraining_documents(spec.data, context.tokenizer())
    if documents is not None:
        on = [key for key in ("reset_position_ids", "reset_attention_mask", "eod_mask_loss") if getattr(documents, key)]
        context.log(f"[{stage.name}] packed windows split at EOD (token {documents.eod_id}): {', '.join(on)}")
    hooks = with_documents(AnyCheckpointInit(), documents)
    parts = build_training(context, stage, loader=train_loader, val_loader_fn=val_loader, hooks=hooks)
    return context.run_loop(stage, parts)
