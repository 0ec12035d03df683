"""One rank of the 2-process run that serves every imported MoE family at EP=2 (test helper).

Started by test_moe_families.py with torchrun's environment variables; argv[1] is a JSON object
{cases: {family: {step_dir, prompt}}, ids, out}. Each family's imported checkpoint is loaded the
way `llmforge generate` loads it, with its experts split over the two ranks (EP=2, each rank two
of the four); every rank gets the full logits on `ids` and the greedy continuation of the prompt,
and rank 0 saves them as `out/<family>-ep2.pt`. The model as loaded at EP=2 is then saved as a
finetune run would save it (`out/<family>-run/checkpoints/sft/step-1`, each rank its own experts,
the spec's `init_from` naming the import), which the test exports in one process.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path


def save_run(run: Path, step_dir: Path, chunks, rank: int) -> None:
    """What an EP=2 finetune of the import leaves: spec.resolved.yaml, tokenizer/, checkpoints/sft/step-1/."""
    import torch.distributed as dist
    import yaml

    from llmforge.runtime.checkpoint import CheckpointManager
    from llmforge.runtime.sharded_io import save_sharded

    imported = step_dir.parents[2]
    if rank == 0:
        run.mkdir(parents=True)
        model = yaml.safe_load((imported / "model.yaml").read_text())["model"]
        spec = {"name": "ft", "model": model, "parallelism": {"expert_model_parallel_size": 2, "nproc_per_node": 2},
                "stages": [{"name": "sft", "type": "sft", "init_from": str(step_dir)}]}
        (run / "spec.resolved.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
        shutil.copytree(imported / "tokenizer", run / "tokenizer")

    def write(tmp: Path) -> None:
        (tmp / "model").mkdir(exist_ok=True)
        dist.barrier()
        save_sharded(tmp / "model", chunks, None, {})

    state = {"version": 1, "stage": "sft", "step": 1, "tokens": 0, "skipped": 0, "extra": {}, "loader": None}
    CheckpointManager(run / "checkpoints" / "sft", keep_last=1, rank=rank, barrier=dist.barrier, log=lambda m: None).save(1, write, state)


def main() -> None:
    import torch

    from llmforge.interop.generate import TextGenerator, generation_layout
    from llmforge.runtime.distributed import shutdown

    args = json.loads(sys.argv[1])
    ids = torch.tensor(args["ids"])
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    out = Path(args["out"])
    layout = generation_layout(["parallelism.expert_model_parallel_size=2"])  # 2 processes: the experts' ranks
    for family, case in args["cases"].items():
        generator = TextGenerator(case["step_dir"], parallelism=layout)
        with torch.no_grad():
            logits = generator.server._forward(ids, positions, None, decoder=None)
        continuation = generator.continuation_ids(case["prompt"], max_new_tokens=32)
        experts = [list(layer.mlp.local_expert_indices) for layer in generator.server.chunks[0].decoder.layers]
        if generator.rank == 0:
            torch.save({"logits": logits, "continuation": continuation, "layout": generator.describe_layout(), "experts": experts},
                       out / f"{family}-ep2.pt")
        save_run(out / f"{family}-run", Path(case["step_dir"]), generator.server.chunks, generator.rank)
    shutdown()


if __name__ == "__main__":
    main()
