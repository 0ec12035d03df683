"""The devices `plan --gpu` knows: memory and peak dense FLOP/s, with the MFU we assume.

GPU memory is what `nvidia-smi` reports as total (a little under the marketing figure);
peaks are the datasheets' dense numbers (no 2:4 sparsity) for the SXM parts. fp32 is
plain fp32, not TF32: torch leaves TF32 off for matmuls by default. The CPU entry is the
2-core machine llmforge is developed on, measured with a 2048² matmul on 2 threads; its
memory is read from this machine, and all ranks of a node share it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from llmforge.spec.errors import UserError

MiB = 2**20


@dataclass(frozen=True)
class Device:
    """One device model, as the planner costs it."""

    name: str
    description: str
    memory_bytes: int
    peak_flops_bf16: float
    peak_flops_fp32: float
    mfu: float  # the model FLOPs utilization the time estimate assumes
    shared_by_node: bool = False  # True: memory and FLOP/s belong to the machine, not to each rank
    peak_flops_fp8: float = 0.0  # dense FP8 tensor-core peak; 0: the device has no FP8 matmuls

    @property
    def kind(self) -> str:
        return "cpu" if self.name == "cpu" else "cuda"

    def peak_flops(self, precision: str) -> float:
        """The peak MFU is reported against: fp32's, else bf16's. FP8 runs too are measured against
        the bf16 peak (as torchtitan reports them): the attention, norms and output layer stay bf16,
        and an MFU over the FP8 peak would not compare with the bf16 run's."""
        return self.peak_flops_fp32 if precision == "fp32" else self.peak_flops_bf16


# Dense multi-billion-parameter training with Megatron reaches 35-50% MFU on A100/H100
# (Korthikanti et al. 2022 report 56% on A100 with selective recompute); 40% is a fair
# middle. On the CPU (this machine, 2026-12-04, against 2 × one core's measured matmul peak, as
# runtime.device reports MFU): the tiny spec's pretrain ~42% (bf16, 2 threads), its sft ~26%,
# shakespeare-char ~58% (fp32, one thread); 30% leans towards the slower stages.
GPU_MFU = 0.40
CPU_MFU = 0.30


def _machine_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 16 * 2**30


CATALOG: dict[str, Device] = {
    d.name: d
    for d in (
        Device("h100-80gb", "NVIDIA H100 SXM 80 GB", 81559 * MiB, 989.4e12, 66.9e12, GPU_MFU, peak_flops_fp8=1978.9e12),
        Device("h200-141gb", "NVIDIA H200 SXM 141 GB", 143771 * MiB, 989.4e12, 66.9e12, GPU_MFU, peak_flops_fp8=1978.9e12),
        Device("a100-40gb", "NVIDIA A100 SXM 40 GB", 40960 * MiB, 312e12, 19.5e12, GPU_MFU),
        Device("a100-80gb", "NVIDIA A100 SXM 80 GB", 81920 * MiB, 312e12, 19.5e12, GPU_MFU),
        Device("l40s-48gb", "NVIDIA L40S 48 GB", 46068 * MiB, 362.05e12, 91.6e12, GPU_MFU, peak_flops_fp8=733e12),
        Device("cpu", "this machine's CPU (2 cores measured)", _machine_memory(), 449e9, 208e9, CPU_MFU, shared_by_node=True),
    )
}

# torch.cuda.get_device_name() fragments → catalog entries (the A100s share their peaks).
_NAME_FRAGMENTS = {"H200": "h200-141gb", "H100": "h100-80gb", "A100": "a100-80gb", "L40S": "l40s-48gb"}


def match_gpu(device_name: str) -> Device | None:
    """The catalog entry for a CUDA device name such as 'NVIDIA H100 80GB HBM3', if known."""
    return next((CATALOG[key] for fragment, key in _NAME_FRAGMENTS.items() if fragment in device_name), None)


def get_device(name: str) -> Device:
    """The catalog entry for `name`, or a UserError listing the names there are."""
    try:
        return CATALOG[name]
    except KeyError:
        from llmforge.spec.errors import did_you_mean

        guess = did_you_mean(name, list(CATALOG))
        hint = f"did you mean {guess!r}? " if guess else ""
        raise UserError(f"unknown --gpu {name!r}", f"{hint}known devices: {', '.join(CATALOG)}") from None
