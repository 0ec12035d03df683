"""A process that imports torch, megatron and llmforge once, then forks one child per CLI run.

Each `llmforge run` of the suite would otherwise pay ~5 s of imports; a forked child starts
warm and runs `llmforge.cli.main(argv)` exactly as the command line does. Nothing here
initializes torch.distributed or OpenMP before forking, so children start clean.

Protocol (JSON lines): a request on stdin, {"procs": [{"argv", "env", "cwd", "stdout",
"stderr", "prelude"}, ...]}, forks one child per entry (the ranks of a job launched by
hand, as srun would) and is answered on stdout by {"pids"} at once, then by one
{"pid", "returncode"} per child as it ends (a negative returncode is the killing signal,
as in subprocess). The next request is read when all of them have ended.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
import warnings


def _warm() -> None:
    warnings.filterwarnings("ignore")
    import megatron.core.dist_checkpointing  # noqa: F401
    import megatron.core.models.gpt  # noqa: F401
    import megatron.core.optimizer  # noqa: F401
    import megatron.core.pipeline_parallel  # noqa: F401
    import torch  # noqa: F401
    import torch.distributed.checkpoint  # noqa: F401

    import llmforge.cli  # noqa: F401
    import llmforge.data.loader  # noqa: F401
    import llmforge.runtime.executor  # noqa: F401
    import llmforge.runtime.sharded_io  # noqa: F401
    import llmforge.runtime.step  # noqa: F401
    import llmforge.stages.pretrain  # noqa: F401
    import llmforge.stages.sft  # noqa: F401


def _child(request: dict) -> None:
    os.setpgid(0, 0)  # its own process group: a test can signal the run and its torchrun children together
    os.chdir(request["cwd"])
    for key, value in request["env"].items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(out, fd)
        os.close(out)
    code = 1
    try:
        if request.get("prelude"):
            exec(request["prelude"], {"__name__": "__prelude__"})
        from llmforge.cli import main

        code = main(request["argv"])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def serve() -> None:
    _warm()
    reply = sys.stdout
    print(json.dumps({"ready": True}), file=reply, flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pids = []
        for proc in request["procs"]:
            pid = os.fork()
            if pid == 0:
                _child(proc)
            pids.append(pid)
        print(json.dumps({"pids": pids}), file=reply, flush=True)
        for _ in pids:
            pid, status = os.wait()
            code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
            print(json.dumps({"pid": pid, "returncode": code}), file=reply, flush=True)


if __name__ == "__main__":
    serve()
