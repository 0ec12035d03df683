"""LoRA run dirs for the PEFT export tests: a base checkpoint, then a `lora` stage's checkpoint.

`save_lora_run` is what test_peft.py calls in its own process. Run as a script (one rank
of a torchrun-style job, argv[1] = JSON {run_dir, options, tp, seed}), each rank builds its
TP shard of the model and the ranks save both checkpoints together; the TP-sharded adapted
model's own logits on fixed ids are gathered into `logits.pt`.
"""

from __future__ import annotations

import json
import sys
import zlib
from pathlib import Path
from typing import Any

if __package__:
    from .tiny import byte_tokenizer, perturb, save_gathered_logits
else:  # run as a script, one rank of the 2-process test
    sys.path.insert(0, str(Path(__file__).parent))
    from tiny import byte_tokenizer, perturb, save_gathered_logits

TARGETS = ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]
LORA = {"rank": 4, "alpha": 12.0, "dropout": 0.05}  # alpha / rank = 3: a wrong scale cannot hide
SEED = 9


def randomize_b(chunks, *, tp_rank: int = 0, tp_size: int = 1) -> None:
    """Give every adapter a random B, the same at every TP layout (a fresh B is zero and would prove nothing).

    Column-parallel B is split by rows (swiglu fc1 as [gate shard; up shard]); row-parallel B is whole.
    """
    import torch

    from llmforge.finetune.lora import PREFIX
    from llmforge.finetune.lora import TARGETS as KINDS
    from llmforge.models.init import unwrap

    for chunk in chunks:
        for index, layer in enumerate(unwrap(chunk).decoder.layers):
            for target, (holder, kind) in KINDS.items():
                adapter = getattr(getattr(layer, holder), PREFIX + target, None)
                if adapter is None:
                    continue
                rows = adapter.B.shape[0] * (tp_size if kind == "column" else 1)
                generator = torch.Generator().manual_seed(zlib.crc32(f"{index}.{target}".encode()))
                full = torch.randn(rows, adapter.B.shape[1], generator=generator) * 0.3
                if kind == "column" and tp_size > 1:
                    halves = full.chunk(2) if adapter.gated else (full,)
                    full = torch.cat([half.chunk(tp_size)[tp_rank] for half in halves])
                with torch.no_grad():
                    adapter.B.copy_(full)


def save_lora_run(run_dir: Path, options: dict[str, Any], chunks, *, targets: list[str] = TARGETS, merge: bool = False,
                  rank: int = 0, tp_rank: int = 0, tp_size: int = 1, barrier=lambda: None) -> Path:
    """Save `chunks` as a `pretrain` checkpoint, attach LoRA with random B, save a `lora` checkpoint; returns its step dir.

    The chunks keep their adapters, so the caller can run the adapted model (unmerged).
    """
    import yaml

    from llmforge.finetune.checkpoints import LORA_META, PartialCheckpoints, base_reference
    from llmforge.finetune.lora import attach_lora, is_adapter_key
    from llmforge.runtime.checkpoint import CheckpointManager
    from llmforge.runtime.sharded_io import save_sharded

    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        spec = {"name": "t", "model": {"name": "gpt", **options},
                "stages": [{"name": "pretrain", "type": "pretrain"},
                           {"name": "lora", "type": "lora", "init_from": "pretrain",
                            "lora": {**LORA, "target_modules": targets, "merge": merge}}]}
        (run_dir / "spec.resolved.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
        byte_tokenizer().save(run_dir / "tokenizer")
    barrier()

    def manager(stage: str) -> CheckpointManager:
        return CheckpointManager(run_dir / "checkpoints" / stage, keep_last=1, rank=rank, barrier=barrier, log=lambda m: None)

    def write_base(tmp: Path) -> None:
        if rank == 0:
            (tmp / "model").mkdir()
        barrier()
        save_sharded(tmp / "model", chunks, None, {})

    def state(stage: str, step: int) -> dict[str, Any]:
        return {"version": 1, "stage": stage, "step": step, "tokens": 0, "skipped": 0, "extra": {}, "loader": None}

    base = manager("pretrain").save(3, write_base, state("pretrain", 3))
    attach_lora(chunks, targets=targets, rank=LORA["rank"], alpha=LORA["alpha"], dropout=LORA["dropout"], seed=SEED)
    randomize_b(chunks, tp_rank=tp_rank, tp_size=tp_size)
    meta = {"base": base_reference(base, run_dir), "rank": LORA["rank"], "alpha": LORA["alpha"], "target_modules": targets,
            "seed": SEED}
    checkpoints = PartialCheckpoints(folder="adapters", select=is_adapter_key, meta_name=LORA_META, meta=meta, rank=rank,
                                     merge_final=merge)
    return manager("lora").save(5, lambda tmp: checkpoints.save(tmp, chunks, None, final=True), state("lora", 5))


def main() -> None:
    import torch
    import torch.distributed as dist

    from llmforge.models.gpt import build_gpt
    from llmforge.runtime.distributed import init_distributed, shutdown
    from llmforge.spec.components import GPTModel
    from llmforge.spec.schema import ParallelismConfig

    args = json.loads(sys.argv[1])
    run_dir = Path(args["run_dir"])
    layout = ParallelismConfig.model_validate({"tensor_model_parallel_size": args["tp"], "nproc_per_node": args["tp"]})
    context = init_distributed(layout, seed=0)
    chunks = build_gpt(GPTModel.model_validate(args["options"]), layout, precision="fp32", seed=args["seed"])
    for chunk in chunks:
        perturb(chunk, tp_rank=context.tp_rank, tp_size=context.tp_size)
    save_lora_run(run_dir, args["options"], chunks, rank=context.rank, tp_rank=context.tp_rank, tp_size=context.tp_size,
                  barrier=dist.barrier)
    save_gathered_logits(chunks[0], run_dir, rank=context.rank, tp_size=context.tp_size)
    dist.barrier()
    shutdown()


if __name__ == "__main__":
    main()
