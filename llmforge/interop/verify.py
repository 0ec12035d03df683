"""The export's self-check: what transformers computes from the files written equals what llmforge computes.

Before an export is published, transformers loads the hidden output directory and runs a few
fixed token sequences; llmforge runs the same ones through its own model (megatron's GPTModel,
from the checkpoint) with the weights the export holds, i.e. rounded to the export's dtype; the
largest logit difference, relative to the largest |logit|, must be at most `TOLERANCE`, or
nothing is published. Both sides compute in fp32 (transformers keeps a bf16 export's weights in
bf16 and widens each module's for its own forward call, so no fp32 copy of the model is made).

The tolerance, 1e-3 for every dtype: both sides hold the same weights and compute in fp32, so
only the order of float operations could differ (measured: exactly 0 for all four families, fp32
and bf16 exports alike, and for a 1B Llama; up to 5e-7 for GPT-2 and PEFT), while a layout
mistake moves the logits by about their own size (two query heads swapped: 1.0 of the scale; gate
and up swapped: 0.8; a norm left at ones: 0.3) and one weight matrix scaled by 1.01 moves them by
0.006. Comparing with llmforge's unrounded fp32 weights instead would mix the dtype's own rounding
in (0.7 % to 1.4 % of the logit scale for the tiny test models' bf16 exports), forcing a bound
loose enough to hide real mistakes of that size; the rounding is the user's choice of `--dtype`,
not a conversion error.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

TOLERANCE = 1e-3
SEQUENCES, TOKENS = 2, 32
SEED = 20261203


class ExportCheckFailed(Exception):
    """The exported files compute other logits than llmforge's model: nothing was published (exit 1)."""


@dataclass(frozen=True)
class Verdict:
    """One comparison of transformers' logits with llmforge's."""

    max_abs_diff: float
    logit_scale: float  # the largest |logit| of llmforge's model on the check's sequences
    tolerance: float  # relative to logit_scale
    what: str  # what was compared, for the message

    @property
    def relative(self) -> float:
        return self.max_abs_diff / max(self.logit_scale, 1e-30)

    @property
    def passed(self) -> bool:
        return self.relative <= self.tolerance

    def line(self) -> str:
        return (f"self-check ({self.what}): max |logit difference| {self.max_abs_diff:.3g} = {self.relative:.2g} of the logit scale "
                f"{self.logit_scale:.3g} (tolerance {self.tolerance:g}): {'passed' if self.passed else 'FAILED'}")

    def as_dict(self) -> dict[str, float | bool | str]:
        return {"max_abs_diff": self.max_abs_diff, "logit_scale": self.logit_scale, "relative": self.relative,
                "tolerance": self.tolerance, "passed": self.passed, "what": self.what}


def missing_library(*names: str) -> str | None:
    """The first of `names` that cannot be imported (None when all can)."""
    import importlib.util

    return next((name for name in names if importlib.util.find_spec(name) is None), None)


def check_ids(vocab_size: int, max_positions: int) -> torch.Tensor:
    """The fixed token sequences both sides run: SEQUENCES × TOKENS ids drawn from the whole vocabulary."""
    import torch

    generator = torch.Generator().manual_seed(SEED)
    return torch.randint(0, vocab_size, (SEQUENCES, min(TOKENS, max_positions)), generator=generator)


def _compute_in_fp32(model: torch.nn.Module) -> None:
    """Give each module its parameters in fp32 for the length of its own forward call, and the stored ones back after.

    So a bf16 export is checked in fp32 without an fp32 copy of the whole model: at any moment
    only one module's weights (at most the embedding) are held in fp32 besides the stored ones,
    which stay the file's own (mapped) memory.
    """
    import torch

    stored: dict[int, torch.Tensor] = {}

    def before(module, args):
        for param in module.parameters(recurse=False):
            stored[id(param)] = param.data
            param.data = param.data.float()

    def after(module, args, output):
        for param in module.parameters(recurse=False):
            param.data = stored.pop(id(param))

    for module in model.modules():
        if any(p.dtype != torch.float32 for p in module.parameters(recurse=False)):
            module.register_forward_pre_hook(before)
            module.register_forward_hook(after)


def transformers_logits(hf_dir: Path, ids: torch.Tensor, *, dtype: str) -> torch.Tensor:
    """What transformers computes from the model directory `hf_dir` on `ids`, in fp32, with weights kept in `dtype`."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=getattr(torch, dtype)).eval()
    _compute_in_fp32(model)
    with torch.no_grad():
        return model(ids).logits.float()


def peft_logits(base_dir: Path, adapter_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    """What PEFT computes on `ids` with the adapters of `adapter_dir` on the base model in `base_dir`, in fp32."""
    import peft
    import torch
    import transformers

    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    with torch.no_grad():
        return model(ids).logits.float()


def round_weights(module: torch.nn.Module, dtype: str) -> None:
    """Round a whole model's weights to the export's dtype in place (kept in fp32): the weights the export holds."""
    import torch

    with torch.no_grad():
        for param in module.parameters():
            param.data = param.data.to(getattr(torch, dtype)).float()


def compare(ours: torch.Tensor, theirs: torch.Tensor, *, what: str) -> Verdict:
    """llmforge's logits against transformers' (or PEFT's)."""
    if theirs.shape != ours.shape:
        raise ExportCheckFailed(f"self-check ({what}): transformers gives logits of shape {tuple(theirs.shape)}, "
                                f"llmforge {tuple(ours.shape)}")
    return Verdict(max_abs_diff=float((theirs - ours).abs().max()), logit_scale=float(ours.abs().max()),
                   tolerance=TOLERANCE, what=what)


def refuse_unless_passed(verdict: Verdict) -> None:
    if not verdict.passed:
        raise ExportCheckFailed(f"{verdict.line()}; nothing was written. The export would compute other logits than the checkpoint, "
                                "which is a bug in llmforge's conversion: please report it with the model's config.json "
                                "(`--no-verify` publishes it anyway)")
