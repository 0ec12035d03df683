"""One rank of a multi-process run that saves a checkpoint at a TP/PP layout (test helper).

Started by test_layouts.py with torchrun's environment variables; argv[1] is a JSON object
{run_dir, options, tp, pp, seed}. Each rank builds its shard of the model, rank 0 writes
the run dir's spec and tokenizer, all ranks save the checkpoint together, and at PP=1 the
TP-sharded model's own logits on fixed ids are gathered and saved as `logits.pt`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def main() -> None:
    import torch
    import torch.distributed as dist
    import yaml

    from llmforge.models.gpt import build_gpt
    from llmforge.runtime.checkpoint import CheckpointManager
    from llmforge.runtime.distributed import init_distributed, shutdown
    from llmforge.runtime.sharded_io import save_sharded
    from llmforge.spec.components import GPTModel
    from llmforge.spec.schema import ParallelismConfig
    from tiny import byte_tokenizer, perturb, save_gathered_logits

    args = json.loads(sys.argv[1])
    run_dir = Path(args["run_dir"])
    layout = ParallelismConfig.model_validate({"tensor_model_parallel_size": args["tp"], "pipeline_model_parallel_size": args["pp"],
                                               "nproc_per_node": args["tp"] * args["pp"]})
    context = init_distributed(layout, seed=0)
    options = GPTModel.model_validate(args["options"])
    chunks = build_gpt(options, layout, precision="fp32", seed=args["seed"])
    for chunk in chunks:
        perturb(chunk, tp_rank=context.tp_rank, tp_size=context.tp_size)
    if context.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        spec = {"name": "t", "model": {"name": "gpt", **args["options"]}, "parallelism": layout.model_dump(),
                "stages": [{"name": "pretrain", "type": "pretrain"}]}
        (run_dir / "spec.resolved.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
        byte_tokenizer().save(run_dir / "tokenizer")

    def write(tmp: Path) -> None:
        if context.rank == 0:
            (tmp / "model").mkdir()
        dist.barrier()
        save_sharded(tmp / "model", chunks, None, {})

    state = {"version": 1, "stage": "pretrain", "step": 3, "tokens": 0, "skipped": 0, "extra": {}, "loader": None}
    CheckpointManager(run_dir / "checkpoints" / "pretrain", keep_last=1, rank=context.rank, barrier=dist.barrier,
                      log=lambda m: None).save(3, write, state)
    if args["pp"] == 1:
        save_gathered_logits(chunks[0], run_dir, rank=context.rank, tp_size=context.tp_size)
    dist.barrier()
    shutdown()


if __name__ == "__main__":
    main()
