"""One rank of the 2-process run that serves every imported family at TP=2 and at PP=2 (test helper).

Started by test_family_import.py with torchrun's environment variables; argv[1] is a JSON object
{cases: {family: {step_dir, prompt}}, ids, layouts: [[tp, pp], ...], out}. For each layout in
turn (megatron's groups are made again on the same process group), each family's imported
checkpoint is loaded the way `llmforge generate` loads it, at that layout; every rank gets the
full logits on `ids` and the greedy continuation of the prompt, and rank 0 saves them as
`out/<family>-tp<T>-pp<P>.pt`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main() -> None:
    import torch

    from llmforge.interop.generate import TextGenerator, generation_layout
    from llmforge.runtime.distributed import shutdown

    args = json.loads(sys.argv[1])
    ids = torch.tensor(args["ids"])
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    out = Path(args["out"])
    for tp, pp in args["layouts"]:
        layout = generation_layout([f"parallelism.tensor_model_parallel_size={tp}", f"parallelism.pipeline_model_parallel_size={pp}"])
        for family, case in args["cases"].items():
            generator = TextGenerator(case["step_dir"], parallelism=layout)
            with torch.no_grad():
                # The server's own forward through every stage: full-vocabulary logits on every rank.
                logits = generator.server._forward(ids, positions, None, decoder=None)
            continuation = generator.continuation_ids(case["prompt"], max_new_tokens=32)
            if generator.rank == 0:
                torch.save({"logits": logits, "continuation": continuation, "layout": generator.describe_layout()},
                           out / f"{family}-tp{tp}-pp{pp}.pt")
    shutdown()


if __name__ == "__main__":
    main()
