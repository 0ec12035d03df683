"""What the fault tests share: a tiny spec, a warm fork server running the CLI, and readers.

The spec needs no file from outside: its data is the synthetic `tasks` source as text,
its tokenizer is by character, its model 2 layers of width 64.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]

SPEC = """\
schema_version: 1
name: fault
seed: 1234
tokenizer: {name: char}
data:
  sources:
    tasks: {name: tasks, tasks: [add2], num_examples: 2000, format: text}
  split: {by: document, val_fraction: 0.05}
  shard_size_mb: 0.02          # ~25 small shards, so that a test can damage some
model:
  name: gpt
  num_layers: 2
  hidden_size: 64
  num_attention_heads: 2
  ffn_hidden_size: 176
  vocab_size: 64
  seq_length: 32
stages:
  - name: prepare
    type: prepare
  - name: pretrain
    type: pretrain
    train:
      micro_batch_size: 4
      global_batch_size: 8
      max_steps: 40
      optimizer: {name: adamw, lr: 1.0e-3}
      lr_schedule: {name: cosine, warmup_steps: 4}
      eval_interval: 20
      eval_iters: 2
logging: {log_interval: 1, sample_tokens: 0, tensorboard: false}
checkpoint: {interval: 10, keep_last: 2}
"""

# prepare → pretrain → sft, for the stage handoff.
# The char tokenizer pads finetune batches with its end-of-document token, so it needs one here.
SFT_SPEC = SPEC.replace("name: fault\n", "name: fault-sft\n").replace("{name: char}", "{name: char, add_eos: true}").replace(
    "      max_steps: 40\n", "      max_steps: 6\n").replace(
    "logging:",
    """  - name: sft
    type: sft
    init_from: pretrain
    data:
      sources:
        addition: {name: tasks, tasks: [add2], num_examples: 400, seed: 1}
      val_fraction: 0.05
    chat_template: plain       # the char tokenizer knows only the characters of the sums
    max_seq_length: 16
    train:
      micro_batch_size: 8
      global_batch_size: 8
      max_steps: 12
      optimizer: {name: adamw, lr: 1.0e-3}
      lr_schedule: {name: constant}
      eval_iters: 1
logging:""",
).replace("checkpoint: {interval: 10, keep_last: 2}", "checkpoint: {interval: 4, keep_last: 2}")

# Variables of the test process that must not leak into a run.
_DROP = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID",
         "LLMFORGE_RUNDIR_READY", "LLMFORGE_RESUMING")


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items()
            if k not in _DROP and not k.startswith(("SLURM_", "LLMFORGE_FAULT"))} | {"PYTHONWARNINGS": "ignore", "PYTHONUNBUFFERED": "1"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


class Job:
    """Processes forked by the server for one request; `wait` collects their exit codes."""

    def __init__(self, server: ForkServer, pids: list[int], logs: list[tuple[Path, Path]]):
        self.server, self.pids, self.logs = server, pids, logs
        self.codes: dict[int, int] = {}

    def wait(self, timeout: float, index: int | None = None) -> int | list[int]:
        """Exit code of process `index` (default: all of them, as a list) within `timeout` s."""
        wanted = self.pids if index is None else [self.pids[index]]
        deadline = time.monotonic() + timeout
        while any(p not in self.codes for p in wanted):
            reply = self.server.read(deadline - time.monotonic())
            if reply is None:
                self.kill()
                raise TimeoutError(f"processes {wanted} still running after {timeout} s:\n" + self.result().output[-4000:])
            self.codes[reply["pid"]] = reply["returncode"]
        self.server.busy = len(self.codes) < len(self.pids)
        return [self.codes[p] for p in self.pids] if index is None else self.codes[self.pids[index]]

    def signal(self, sig: int, index: int = 0) -> None:
        os.killpg(self.pids[index], sig)  # the run and any torchrun it started

    def kill(self) -> None:
        for pid in self.pids:
            if pid not in self.codes:
                try:
                    os.killpg(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        while len(self.codes) < len(self.pids):
            reply = self.server.read(30)
            if reply is None:
                raise RuntimeError("fork server lost its children")
            self.codes[reply["pid"]] = reply["returncode"]
        self.server.busy = False

    def result(self, index: int = 0) -> Result:
        out, err = self.logs[index]
        read = lambda p: p.read_text(errors="replace") if p.exists() else ""  # noqa: E731
        return Result(self.codes.get(self.pids[index], 0), read(out), read(err))


class ForkServer:
    """Client of tests/fault/forkserver.py: CLI runs forked from one warm interpreter."""

    def __init__(self, logs: Path):
        self.logs = logs
        self.count = 0
        self.busy = False
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.fault.forkserver"], cwd=ROOT, env=clean_env(),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=False)
        self._buffer = b""
        ready = self.read(300)
        assert ready == {"ready": True}, ready

    def read(self, timeout: float) -> dict | None:
        deadline = time.monotonic() + max(timeout, 0)
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.proc.stdout], [], [], left)[0]:
                return None
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            if not chunk:
                raise RuntimeError(f"fork server exited with {self.proc.wait()}")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    def start(self, procs: list[dict[str, Any]]) -> Job:
        assert not self.busy, "the previous job has not been waited for"
        logs = []
        for proc in procs:
            self.count += 1
            out, err = self.logs / f"{self.count:03d}.out", self.logs / f"{self.count:03d}.err"
            proc.update(stdout=str(out), stderr=str(err))
            proc.setdefault("cwd", str(ROOT))
            proc.setdefault("env", {})
            logs.append((out, err))
        self.proc.stdin.write((json.dumps({"procs": procs}) + "\n").encode())
        self.proc.stdin.flush()
        reply = self.read(120)
        assert reply is not None and "pids" in reply, reply
        self.busy = True
        return Job(self, reply["pids"], logs)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


class Runner:
    """`llmforge` as the tests call it: warm forks for runs, plain subprocesses where a cold start matters."""

    def __init__(self, server: ForkServer, spec: Path):
        self.server, self.spec = server, spec

    def start(self, *args: str, env: dict[str, str | None] | None = None, prelude: str | None = None, spec: Path | None = None) -> Job:
        return self.server.start([{"argv": ["run", str(spec or self.spec), *args], "env": env or {}, "prelude": prelude}])

    def __call__(self, *args: str, env: dict[str, str | None] | None = None, prelude: str | None = None, spec: Path | None = None,
                 timeout: float = 300) -> Result:
        job = self.start(*args, env=env, prelude=prelude, spec=spec)
        job.wait(timeout)
        return job.result()

    def ranks(self, *args: str, world: int = 2, env: dict[int, dict[str, str]] | None = None, spec: Path | None = None,
              nproc_per_node: int | None = None) -> Job:
        """A job of `world` ranks launched by hand (as srun launches them): no torchrun agent watches over them.

        Each is told `--nproc-per-node nproc_per_node` (default: `world`, the launch's own size).
        """
        port = str(free_port())
        procs = []
        for rank in range(world):
            rank_env = {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world),
                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, **(env or {}).get(rank, {})}
            procs.append({"argv": ["run", str(spec or self.spec), "--nproc-per-node", str(nproc_per_node or world), *args], "env": rank_env})
        return self.server.start(procs)


def cold(*args: str, cwd: Path = ROOT, env: dict[str, str] | None = None, timeout: float = 300) -> Result:
    """`python -m llmforge.cli ...` in a fresh interpreter."""
    proc = subprocess.run([sys.executable, "-m", "llmforge.cli", *args], cwd=cwd, env=clean_env() | (env or {}),
                          capture_output=True, text=True, timeout=timeout)
    return Result(proc.returncode, proc.stdout, proc.stderr)


# --- reading what a run left ----------------------------------------------------------------

def rows(run_dir: Path, kind: str = "train", stage: str = "pretrain") -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind and r["stage"] == stage]


def losses(run_dir: Path, stage: str = "pretrain") -> dict[int, float]:
    return {r["step"]: r["loss"] for r in rows(run_dir, "train", stage)}


def steps_saved(run_dir: Path, stage: str = "pretrain") -> list[int]:
    """Steps of the complete checkpoints of a stage."""
    root = run_dir / "checkpoints" / stage
    if not root.exists():
        return []
    return sorted(int(p.name.split("-")[1]) for p in root.iterdir() if p.name.startswith("step-") and (p / "COMPLETE").exists())


def weights(step_dir: Path) -> dict[str, Any]:
    """Every tensor and value of a checkpoint's model and optimizer, by global key (any layout)."""
    import tempfile

    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(step_dir / "model", Path(tmp) / "w.pt")
        state = torch.load(Path(tmp) / "w.pt", weights_only=False)

    def flat(d: dict, prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    return flat(state)


def assert_same_weights(a: Path, b: Path, *, atol: float = 0.0) -> None:
    import torch

    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    tensors = 0
    for key, value in wa.items():
        if isinstance(value, torch.Tensor):
            tensors += 1
            if atol == 0:
                assert torch.equal(value, wb[key]), f"{key} differs: max |Δ| {(value - wb[key]).abs().max().item():.3g}"
            else:
                torch.testing.assert_close(value, wb[key], atol=atol, rtol=0, msg=lambda m, k=key: f"{k}: {m}")
        else:
            assert value == wb[key], key
    assert tensors > 20  # the model and the optimizer's moments were compared


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True, ignore=shutil.ignore_patterns(".lock"))
    return dst
