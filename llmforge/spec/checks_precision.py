"""Cross-field checks of `precision: fp8` (TransformerEngine's FP8 through megatron-core).

What `run` would refuse for a spec-shaped reason, `validate` refuses first: a missing
TransformerEngine (looked up with `find_spec`, never imported: validate imports no torch;
a fact of the machine, so checked with the input files),
the stage types the FP8 path is built for, packed documents (the SDPA block-causal path;
TE's packed-sequence path is not wired in), and matmul shapes TE's FP8 GEMMs cannot take.
The CUDA device itself is checked by `run`: a spec cannot say which machine it lands on.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator

from llmforge.spec.checks import Sections, _issue, _step_length, check
from llmforge.spec.errors import SpecIssue
from llmforge.spec.load import LoadedSpec

FP8_STAGES = ("pretrain", "sft")  # full-weight training; adapters, preference and RL stages stay on bf16
FP8_EXTRA = 'pip install -e ".[gpu]" (transformer-engine[pytorch], CUDA only)'
# TE's FP8 GEMMs take a matrix whose last dimension is a multiple of 16 and whose other
# dimensions multiply to a multiple of 8 (transformer_engine.pytorch.utils.assert_dim_for_fp8_exec);
# 16 for every width keeps both sides of each GEMM (forward and the transposed backward) valid.
FP8_MULTIPLE = 16


def _fp8_stages(s: Sections) -> Iterator[tuple[int, object]]:
    for i, stage in enumerate(s["stages"]):
        if getattr(getattr(stage, "train", None), "precision", None) == "fp8":
            yield i, stage


def transformer_engine_installed() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def machine_issues(s: Sections, loaded: LoadedSpec) -> Iterator[SpecIssue]:
    """FP8 runs through TransformerEngine's layers; without it there is no FP8 path at all.

    A fact of the machine, like the input files: checked by `validate` and `run`, not by
    `plan` (a cluster spec is planned where TE need not be installed) or `--skip-inputs`."""
    if "stages" not in s or transformer_engine_installed():
        return
    for i, stage in _fp8_stages(s):
        yield _issue(loaded, ("stages", i, "train", "precision"),
                     f"stage {stage.name!r}: precision fp8 runs through TransformerEngine, which is not installed here",
                     f"{FP8_EXTRA}, or use precision: bf16")


@check("stages")
def _fp8_stage_types(s: Sections, loaded: LoadedSpec) -> Iterator[SpecIssue]:
    """The FP8 path trains every weight of TE's layers; frozen bases, adapters and generation are bf16's."""
    for i, stage in _fp8_stages(s):
        if stage.type not in FP8_STAGES:
            yield _issue(loaded, ("stages", i, "type"),
                         f"precision fp8 is built for stage types {', '.join(FP8_STAGES)}, not {stage.type!r}",
                         "use precision: bf16 for this stage")
        if getattr(stage, "packing", None) is True:
            yield _issue(loaded, ("stages", i, "packing"),
                         "packing: true masks attention per document with SDPA; precision fp8 uses TransformerEngine's attention, "
                         "whose packed-sequence path is not wired in", "turn packing off, or use precision: bf16")


@check("data", "stages")
def _fp8_without_document_masks(s: Sections, loaded: LoadedSpec) -> Iterator[SpecIssue]:
    """Block-causal masks of packed documents are SDPA's; the FP8 path's attention is TE's."""
    if not getattr(s["data"], "reset_attention_mask", False):
        return
    for i, stage in _fp8_stages(s):
        if stage.type == "pretrain":
            yield _issue(loaded, ("data", "reset_attention_mask"),
                         f"stage {stage.name!r} trains in precision fp8 through TransformerEngine, whose packed-sequence "
                         "attention is not wired in; data.reset_attention_mask needs SDPA's block-causal mask",
                         "turn data.reset_attention_mask off, or use precision: bf16")


@check("model", "parallelism", "stages")
def _fp8_matmul_shapes(s: Sections, loaded: LoadedSpec) -> Iterator[SpecIssue]:
    """Every FP8 GEMM's dimensions on one rank, and the tokens of a micro batch, are multiples of 16."""
    model, par = s["model"], s["parallelism"]
    stages = list(_fp8_stages(s))
    hidden = getattr(model, "hidden_size", None)
    if not stages or hidden is None:
        return
    tp = par.tensor_model_parallel_size
    heads, groups = model.num_attention_heads, getattr(model, "num_query_groups", None) or model.num_attention_heads
    head_dim = getattr(model, "kv_channels", None) or hidden // heads
    ffn = getattr(model, "ffn", None) or getattr(model, "ffn_hidden_size", None) or 4 * hidden
    widths = {("model", "hidden_size"): ("hidden_size", hidden),
              ("model", "num_attention_heads"): ("the query width per tensor-parallel rank", heads * head_dim // tp),
              ("model", "num_query_groups"): ("the key/value width per tensor-parallel rank", groups * head_dim // tp),
              ("model", "ffn_hidden_size"): ("ffn_hidden_size per tensor-parallel rank", ffn // tp)}
    for path, (what, width) in widths.items():
        if width % FP8_MULTIPLE:
            yield _issue(loaded, path, f"precision fp8: {what} is {width}, not a multiple of {FP8_MULTIPLE}, which TransformerEngine's "
                         "FP8 matmuls need", f"use a width that is a multiple of {FP8_MULTIPLE} × tensor_model_parallel_size, or precision: bf16")
    for i, stage in stages:
        length = _step_length(stage, model)
        if length is None:
            continue
        tokens = stage.train.micro_batch_size * length // (tp if par.sequence_parallel else 1)
        if tokens % FP8_MULTIPLE:
            yield _issue(loaded, ("stages", i, "train", "micro_batch_size"),
                         f"precision fp8: a micro batch holds {tokens} tokens per rank (micro_batch_size × sequence length"
                         + (" / tensor-parallel size" if par.sequence_parallel else "") + f"), not a multiple of {FP8_MULTIPLE}, "
                         "which TransformerEngine's FP8 matmuls need", "choose micro_batch_size or the sequence length so that it is")
