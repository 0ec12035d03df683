"""One rank of a parity launch: `llmforge eval` (the CLI, under this launcher's environment) on every model at one layout.

    python parity_worker.py '{"overrides": [...], "cases": [{"source": ..., "output": ..., "chat": bool}], "common": [...]}'

The process group is made here once, so each evaluation (the CLI's own code, in this process) only makes
megatron's groups again, as tests/unit/interop/finetune_worker.py does.
"""

from __future__ import annotations

import json
import os
import sys


def main() -> int:
    import torch.distributed as dist

    from llmforge.cli import main as cli

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{os.environ['MASTER_PORT']}", rank=int(os.environ["RANK"]),
                            world_size=int(os.environ["WORLD_SIZE"]))
    args = json.loads(sys.argv[1])
    for case in args["cases"]:
        argv = ["eval", case["source"], *args["overrides"], *args["common"], "--output", case["output"]]
        code = cli([*argv, "--apply-chat-template"] if case["chat"] else argv)
        if code != 0:
            print(f"llmforge {' '.join(argv)} exited {code}", file=sys.stderr)
            return code
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
