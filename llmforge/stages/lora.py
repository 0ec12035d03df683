"""The `lora` stage: SFT of low-rank adapters on a frozen model; checkpoints hold the adapters alone."""

from __future__ import annotations

from typing import Any

from llmforge.finetune.checkpoints import PartialCheckpoints
from llmforge.runtime.context import RunContext


class LoRAHooks(PartialCheckpoints):
    """Low-rank adapters on the frozen model; checkpoints hold the adapters (and their optimizer state) alone."""

    def __init__(self, stage, context: RunContext, meta: dict[str, Any]) -> None:
        from llmforge.finetune.checkpoints import LORA_META
        from llmforge.finetune.lora import is_adapter_key

        super().__init__(folder="adapters", select=is_adapter_key, meta_name=LORA_META, meta=meta, rank=context.parallel().rank,
                         merge_final=stage.lora.merge)
        self.stage, self.context = stage, context
        self.counts: dict[str, int] = {}

    def adapt(self, chunks: list) -> None:
        from llmforge.finetune.lora import attach_lora

        opts, counts = self.stage.lora, self.counts
        attached = attach_lora(chunks, targets=list(opts.target_modules), rank=opts.rank, alpha=opts.alpha, dropout=opts.dropout,
                               seed=self.context.spec.seed)
        params = [p for chunk in chunks for p in chunk.parameters()]
        counts.update(trainable=sum(p.numel() for p in params if p.requires_grad), total=sum(p.numel() for p in params))
        self.context.log(f"[{self.stage.name}] {len(attached)} LoRA adapters (rank {opts.rank}, alpha {opts.alpha:g}) on "
                         f"{', '.join(opts.target_modules)}: {counts['trainable']:,} of {counts['total']:,} parameters train "
                         f"({counts['trainable'] / counts['total']:.2%}, this rank)")


def run(stage, *, context: RunContext) -> dict[str, Any]:
    from llmforge.finetune.checkpoints import base_reference
    from llmforge.finetune.common import check_layout
    from llmforge.runtime.documents import PACKED_EXAMPLES, with_documents
    from llmforge.runtime.training import build_training
    from llmforge.stages.sft import finetune_loaders, instruction_packer, sequence_length

    check_layout(context, stage)
    spec, opts = context.spec, stage.lora
    length = sequence_length(context, stage)
    loader, val_loader, train_recs, val_recs = finetune_loaders(context, stage, instruction_packer(context.tokenizer(), stage, length),
                                                                length=length)
    base = context.final_checkpoint(stage.init_from)
    meta = {"base": base_reference(base, context.run.path), "rank": opts.rank, "alpha": opts.alpha,
            "target_modules": list(opts.target_modules), "seed": spec.seed}
    hooks = LoRAHooks(stage, context, meta)
    parts = build_training(context, stage, loader=loader, val_loader_fn=val_loader, seq_length=length,
                           hooks=with_documents(hooks, PACKED_EXAMPLES if stage.packing else None))
    summary = context.run_loop(stage, parts, evaluate_start=True)
    return {**summary, "train_examples": len(train_recs), "val_examples": len(val_recs), "trainable_parameters": hooks.counts["trainable"]}
