"""What the training benchmarks run: the model shapes, both sides' training steps, and machine figures.

`train_bench`, `memory_bench` and `checkpoint_bench` build the same two sides from here:
llmforge's step exactly as the pretrain stage assembles it (`build_gpt` → `build_adamw` →
`wrap_optimizer` → `TrainStep`), and the plain-PyTorch reference (`reference_gpt`). Not a
benchmark module itself (no `_bench` suffix): run.py does not collect it. torch is
imported inside the functions, so that importing this module stays cheap.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import yaml
from harness import ROOT

TINY_SPEC = ROOT / "specs" / "tiny.yaml"


@dataclass(frozen=True)
class Workload:
    """A model shape and the batch one optimizer step trains on."""

    name: str
    model: dict[str, Any]  # the spec's `model` keys, without `name`
    micro_batch_size: int
    num_micro_batches: int
    lr: float = 1.0e-3

    def options(self):
        from llmforge.spec.components import GPTModel

        return GPTModel(**self.model)

    @property
    def seq_length(self) -> int:
        return self.model["seq_length"]

    @property
    def tokens_per_step(self) -> int:
        return self.micro_batch_size * self.num_micro_batches * self.seq_length

    def shrunk(self, micro_batch_size: int, num_micro_batches: int) -> Workload:
        """The same model on a smaller batch (quick mode)."""
        return Workload(self.name, self.model, micro_batch_size, num_micro_batches, self.lr)


def tiny_workload() -> Workload:
    """specs/tiny.yaml's model and pretrain batch (8 × 256 tokens, 2 micro batches)."""
    spec = yaml.safe_load(TINY_SPEC.read_text())
    model = {k: v for k, v in spec["model"].items() if k != "name"}
    train = next(s["train"] for s in spec["stages"] if s["type"] == "pretrain")
    micro = train["micro_batch_size"]
    return Workload("tiny", model, micro, train["global_batch_size"] // micro, train["optimizer"]["lr"])


# ~10M parameters in GPT-2's switches (the tiny spec covers Llama's): LayerNorm, GELU,
# learned positions, biases, tied embeddings. 8 × 0.79M per layer + 16384 × 256 embedding.
TEN_M = Workload(
    "10m",
    {"num_layers": 8, "hidden_size": 256, "num_attention_heads": 8, "vocab_size": 16384, "seq_length": 256,
     "position_embedding_type": "learned_absolute", "normalization": "LayerNorm", "activation": "gelu", "add_bias_linear": True},
    micro_batch_size=4,
    num_micro_batches=2,
)


def workload(name: str) -> Workload:
    return {"tiny": tiny_workload, "10m": lambda: TEN_M}[name]()


def batches(work: Workload, seed: int = 0) -> list:
    """The micro batches both sides train on: token ids [micro_batch_size, seq_length + 1]."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, work.model["vocab_size"], (work.micro_batch_size * work.num_micro_batches, work.seq_length + 1), generator=generator)
    return list(tokens.split(work.micro_batch_size))


# --- the two sides -----------------------------------------------------------------------


def build_llmforge(work: Workload, *, seed: int = 1234, precisions: tuple[str, ...] = ("fp32", "bf16-autocast", "bf16")) -> dict[str, Any]:
    """llmforge's model, optimizer and one TrainStep per precision, assembled as the pretrain stage does.

    fp32 and bf16-autocast share one model with fp32 parameters (the config's autocast dtype is
    unused on CPU: TrainStep owns autocast); megatron's bf16 gets its own, with bf16 parameters.
    Returns {"chunks": {precision: chunks}, "optimizer": {precision: optimizer}, "step": {precision:
    callable(batches) -> loss}}.
    """
    from llmforge.models.gpt import build_gpt
    from llmforge.runtime.distributed import init_distributed
    from llmforge.runtime.optim import build_adamw, wrap_optimizer
    from llmforge.runtime.step import TrainStep
    from llmforge.spec.components import AdamW
    from llmforge.spec.schema import ParallelismConfig

    options = work.options()
    parallelism = ParallelismConfig()
    ctx = init_distributed(parallelism, seed=seed)
    built: dict[str, tuple] = {}
    out: dict[str, dict] = {"chunks": {}, "optimizer": {}, "step": {}}
    for precision in precisions:
        params = "bf16" if precision == "bf16" else "fp32"
        if params not in built:
            chunks = build_gpt(options, parallelism, precision=precision, seed=seed)
            built[params] = chunks, wrap_optimizer(build_adamw(AdamW(lr=work.lr), model_chunks=chunks), chunks, parallelism)
        chunks, optimizer = built[params]
        step = TrainStep(chunks, optimizer, parallelism_ctx=ctx, seq_length=work.seq_length, micro_batch_size=work.micro_batch_size,
                         precision=precision, clip_grad=None)
        out["chunks"][precision], out["optimizer"][precision] = chunks, optimizer
        out["step"][precision] = lambda micro_batches, step=step: step(micro_batches, work.lr).loss
    return out


# What the reference runs for each llmforge precision: megatron's bf16 against nanoGPT's recipe, bf16 autocast.
REFERENCE_PRECISION = {"fp32": "fp32", "bf16-autocast": "bf16", "bf16": "bf16"}


def build_reference(work: Workload, *, seed: int = 1234) -> dict[str, Any]:
    """The plain-PyTorch reference of the same shape, keyed by llmforge's precisions (see REFERENCE_PRECISION)."""
    import reference_gpt as ref

    model = ref.ReferenceGPT(ref.Shape.of(work.options()), seed=seed)
    optimizer = ref.build_optimizer(model, lr=work.lr)
    steps = {
        precision: lambda micro_batches, theirs=theirs: ref.train_step(model, optimizer, micro_batches, lr=work.lr, precision=theirs)
        for precision, theirs in REFERENCE_PRECISION.items()
    }
    return {"model": model, "optimizer": optimizer, "step": steps}


# --- machine figures -----------------------------------------------------------------------


def _status_kb(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def rss_mb() -> float:
    """Resident memory now."""
    return _status_kb("VmRSS") / 1024


def peak_rss_mb() -> float:
    """The high-water mark of resident memory since the process started."""
    return _status_kb("VmHWM") / 1024


def matmul_peak_flops(dtype_name: str, size: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of the best of `repeats` size² matmuls: this CPU's practical peak, in the dtype given."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    torch.mm(a, b)  # thread pool and packing buffers
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def timed(fn: Callable[[], Any]) -> tuple[float, float]:
    """(wall, process CPU) seconds of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu
