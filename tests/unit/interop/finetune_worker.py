"""One rank of the launch that finetunes every imported family at one layout (test helper).

Started by test_finetune_families.py and test_moe_finetune.py with torchrun's environment variables;
argv[1] is a JSON object {runs: {family: {spec, run_dir, stages}}, ids, layout: [tp, pp] or
overrides: ["parallelism.KEY=VALUE", ...], out}. The process group
is made here once, so each family's `llmforge run` (the CLI's own code, in this process) only
makes megatron's groups again. Then each finished stage's checkpoint is loaded the way `llmforge
generate` loads it, at the same layout, and rank 0 saves the full logits on `ids` as
`out/<family>-<stage>.pt`.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def main() -> None:
    import torch
    import torch.distributed as dist

    from llmforge.cli import main as cli
    from llmforge.interop.generate import TextGenerator, generation_layout
    from llmforge.runtime.distributed import shutdown

    args = json.loads(sys.argv[1])
    world = int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{os.environ['MASTER_PORT']}", rank=int(os.environ["RANK"]),
                            world_size=world)
    ids = torch.tensor(args["ids"])
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    if "overrides" in args:  # any layout (test_moe_finetune.py: expert parallelism)
        layout = generation_layout(args["overrides"], nproc_per_node=world)
    else:
        tp, pp = args["layout"]
        layout = generation_layout([f"parallelism.tensor_model_parallel_size={tp}", f"parallelism.pipeline_model_parallel_size={pp}"])
    out = Path(args["out"])
    for family, case in args["runs"].items():
        code = cli(["run", case["spec"], "--run-dir", case["run_dir"]])
        assert code == 0, f"{family}: llmforge run exited with {code}"
        for stage in case["stages"]:
            generator = TextGenerator(Path(case["run_dir"]), stage=stage, parallelism=layout)
            with torch.no_grad():
                logits = generator.server._forward(ids, positions, None, decoder=None)
            if generator.rank == 0:
                torch.save(logits, out / f"{family}-{stage}.pt")
    shutdown()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
