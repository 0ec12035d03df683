"""Cross-field checks. Each takes the sections that parsed and returns located issues."""

from __future__ import annotations

import glob
import os
from collections.abc import Callable, Iterator
from typing import Any

from llmforge.spec.errors import SpecIssue
from llmforge.spec.load import LoadedSpec

Sections = dict[str, Any]
Check = Callable[[Sections, LoadedSpec], Iterator[SpecIssue]]
CHECKS: list[tuple[tuple[str, ...], Check]] = []


def check(*needs: str) -> Callable[[Check], Check]:
    """Register a check that runs only when all of `needs` parsed."""

    def deco(fn: Check) -> Check:
        CHECKS.append((needs, fn))
        return fn

    return deco


def _issue(loaded: LoadedSpec, path: tuple, message: str, hint: str | None = None) -> SpecIssue:
    return SpecIssue(path, message, hint, loaded.locate(path))


@check("model", "parallelism")
def _tensor_parallel_divides(s: Sections, loaded: LoadedSpec) -> Iterator[SpecIssue]:
    model, par = s["model"], s["parallelism"]
    tp = par.tensor_model_parallel_size
    heads = getattr(model, "num_attention_heads", None)
    if heads is not None and heads % tp:
        yield _issue(loaded, ("parallelism", "tensor_model_parallel_size"),
                     f"num_attention_heads {heads} is not divisible by tensor_model_parallel_size {tp}",
                     f"use a tensor-parallel size that divides {heads} (e.g. {max(d for d in range(1, tp + 1) if heads % d == 0)})")
    groups = getattr(model, "num_query_groups", None)
    if groups is not None and groups % tp:
        yield _issue(loaded, ("parallelism", "tensor_model_parallel_size"),
                     f"num_query_groups {groups} is not divisible by tensor_model_parallel_size {tp}",
                     "each tensor-parallel rank needs whole key/value groups")
    if par.sequence_parallel and tp == 1:
        yield _issue(loaded, ("parallelism", "sequence_parallel"), "sequence_parallel needs tensor_model_parallel_size > 1",
                     "turn sequence_parallel off or raise tensor_model_parallel_size")


@check("model", "parallelism")
def _pipeline_divides(s: Sections, loaded: LoadedSpec) -> Iterator[SpecIssue]:
    model, par = s["model"], s["parallelism"]
    layers = getattr(model, "num_layers", None)
    pp, vpp = par.pipeline_model_parallel_size, par.virtual_pipeline_model_parallel_size
    if vpp is not None and pp == 1:
        yield _issue(loaded, ("parallelism", "virtual_pipeline_model_parallel_size"),
                     "virtual_pipeline_model_parallel_size needs pipeline_model_parallel_size > 1", "remove it or raise the pipeline size")
    chunks = pp * (vpp or 1)
    if layers is not None and layers % chunks:
        what = f"pipeline_model_parallel_size {pp}" + (f" × virtual {vpp}" if vpp else "")
        yield _issue(loaded, ("parallelism", "pipeline_model_parallel_size"),
                     f"num_layers {layers} is not divisible by {what} = {chunks}",
                     "every pipeline chunk needs the same number of layers")


@check("parallelism")
def _world_size(s: Sections, loaded: LoadedSpec) -> Iterator[SpecIssue]:
    par = s["parallelism"]
    model_parallel = par.tensor_model_parallel_size * par.pipeline_model_parallel_size
    world = par.world_size
    if world % model_parallel:
        yield _issue(loaded, ("parallelism", "nproc_per_node"),
                     f"world size nnodes × nproc_per_node = {world} is not divisible by tensor × pipeline = {model_parallel}",
                     "launch a multiple of tensor_model_parallel_size × pipeline_model_parallel_size processes")
    elif par.data_parallel_size != "auto" and par.data_parallel_size * model_parallel != world:
        yield _issue(loaded, ("parallelism", "data_parallel_size"),
                     f"data_parallel_size {par.data_parallel_size} × tensor × pipeline ({model_parallel}) = "
                     f"{par.data_parallel_size * model_parallel}, but nnodes × nproc_per_node = {world}",
                     f"set data_parallel_size: {world // model_parallel} or `auto`")


@check("stages", "parallelism")
def _batch_divides(s: Sections, loaded: LoadedSpec) -> Iterator[SpecIssue]:
    par = s["parallelism"]
    if par.world_size % (par.tensor_model_parallel_size * par.pipeline_model_parallel_size):
        return
    dp = par.resolved_data_parallel_size()
    for i, stage in enumerate(s["stages"]):
        train = getattr(stage, "train", None) if stage is not None else None
        if train is None:
            continue
        per_step = train.micro_batch_size * dp
        if train.global_batch_size % per_step:
            yield _issue(loaded, ("stages", i, "train", "global_batch_size"),
                         f"global_batch_size {train.global_batch_size} is not divisible by micro_batch_size {train.micro_batch_size} × "
                         f"data-parallel size {dp} = {per_step}",
                         f"use a multiple of {per_step}, e.g. {max(per_step, train.global_batch_size // per_step * per_step)}")


@check("model")
def _positions(s: Sections, loaded: LoadedSpec) -> Iterator[SpecIssue]:
    model = s["model"]
    seq, maxpos = getattr(model, "seq_length", None), getattr(model, "max_position_embeddings", None)
    if seq is not None and maxpos is not None and seq > maxpos:
        yield _issue(loaded, ("model", "seq_length"), f"seq_length {seq} is longer than max_position_embeddings {maxpos}",
                     "raise max_position_embeddings or shorten seq_length")


def tokenizer_vocab_size(tokenizer: Any) -> int | None:
    """The vocabulary a tokenizer config implies, when it is known before training."""
    if tokenizer.name == "bpe":
        return tokenizer.vocab_size
    if tokenizer.name == "byte":
        sp = tokenizer.special_tokens
        return 256 + 2 + (sp.bos is not None) + len(sp.chat_roles) + len(sp.extra)
    return None


@check("tokenizer", "model")
def _vocab_fits(s: Sections, loaded: LoadedSpec) -> Iterator[SpecIssue]:
    need = tokenizer_vocab_size(s["tokenizer"])
    have = getattr(s["model"], "vocab_size", None)
    if need is not None and have is not None and need > have:
        yield _issue(loaded, ("model", "vocab_size"), f"model vocab_size {have} is smaller than the tokenizer's vocabulary {need}",
                     f"set model.vocab_size ≥ {need} (a multiple of 128 is fastest)")


@check("stages")
def _init_from_earlier(s: Sections, loaded: LoadedSpec) -> Iterator[SpecIssue]:
    earlier: list[str] = []
    raw = loaded.data.get("stages") or []
    names = [x.get("name") if isinstance(x, dict) and isinstance(x.get("name"), str) else None for x in raw]
    for i, stage in enumerate(s["stages"]):
        if stage is None:
            earlier.append(names[i])
            continue
        ref = getattr(stage, "init_from", None)
        if ref is not None and ref not in earlier and not _is_checkpoint_path(ref):
            later = ref in names
            why = "it comes later" if later else "no stage has that name"
            yield _issue(loaded, ("stages", i, "init_from"), f"init_from {ref!r} must name an earlier stage, but {why}",
                         f"earlier stages: {', '.join(e for e in earlier if e) or 'none'}")
        earlier.append(stage.name)


@check("stages", "parallelism")
def _stage_supports_layout(s: Sections, loaded: LoadedSpec) -> Iterator[SpecIssue]:
    from llmforge.spec.stages import layout_problems

    for i, stage in enumerate(s["stages"]):
        for message in layout_problems(stage, s["parallelism"]) if stage is not None else ():
            yield _issue(loaded, ("stages", i, "type"), message, "change parallelism for this spec, or run the stage from a spec of its own (init_from takes a checkpoint path)")


def _is_checkpoint_path(ref: str) -> bool:
    return "/" in ref or os.sep in ref


@check("data")
def _mix_names_sources(s: Sections, loaded: LoadedSpec) -> Iterator[SpecIssue]:
    data = s["data"]
    for key in (data.mix or {}):
        if key not in data.sources:
            yield _issue(loaded, ("data", "mix", key), f"mix names {key!r}, which is not a source",
                         f"sources: {', '.join(data.sources) or 'none'}")


@check("data", "stages")
def _pretrain_val_split(s: Sections, loaded: LoadedSpec) -> Iterator[SpecIssue]:
    """A pretrain stage's val_loss reads the prepared val split, which val_fraction 0 leaves empty."""
    if s["data"].split.val_fraction > 0:
        return
    for i, stage in enumerate(s["stages"]):
        if getattr(stage, "type", None) != "pretrain":
            continue
        for j, ev in enumerate(stage.evaluators):
            if getattr(ev, "name", None) == "val_loss":
                yield _issue(loaded, ("data", "split", "val_fraction"),
                             f"data.split.val_fraction is 0, so there is no val split, but stages[{i}] ({stage.name}) lists the val_loss "
                             f"evaluator (evaluators[{j}]), which reads it",
                             "set data.split.val_fraction > 0 (e.g. 0.01), or give the stage `evaluators: []` or other evaluators")


@check("tokenizer", "stages")
def _documents_need_padding(s: Sections, loaded: LoadedSpec) -> Iterator[SpecIssue]:
    """`packing: documents` pads short documents; padding must be a token of its own, never a real character."""
    tok = s["tokenizer"]
    if getattr(tok, "name", None) != "char" or getattr(tok, "add_eos", True):
        return
    for i, stage in enumerate(s["stages"]):
        if getattr(stage, "packing", None) == "documents":
            yield _issue(loaded, ("stages", i, "packing"),
                         "packing: documents pads each document to seq_length+1, and the char tokenizer without add_eos has no token "
                         "to pad with (id 0 is a real character)",
                         "set tokenizer.add_eos: true (padding then uses EOS and carries no loss), or use packing: windows")


@check("stages")
def _finetune_val_split(s: Sections, loaded: LoadedSpec) -> Iterator[SpecIssue]:
    """A finetune stage's val_loss reads the stage's own val split, which data.val_fraction 0 leaves empty."""
    from llmforge.spec.stages import val_split_readers

    for i, stage in enumerate(s["stages"]):
        data = getattr(stage, "data", None) if stage is not None else None
        if getattr(data, "val_fraction", None) != 0:
            continue
        readers = val_split_readers(stage)
        if readers:
            yield _issue(loaded, ("stages", i, "data", "val_fraction"),
                         f"data.val_fraction is 0, so stage {stage.name!r} has no val split, but it lists the {', '.join(readers)} "
                         "evaluator, which reads it (a finetune stage never evaluates on its training examples)",
                         "raise data.val_fraction (e.g. 0.05), or list only evaluators with their own data "
                         "(`evaluators: []` for none; the default is [val_loss])")


def _input_fields(s: Sections) -> Iterator[tuple[tuple, Any]]:
    """(path, options) of every component that reads input files."""
    if "data" in s:
        for key, src in s["data"].sources.items():
            yield ("data", "sources", key), src
    for i, stage in enumerate(s.get("stages") or []):
        data = getattr(stage, "data", None) if stage is not None else None
        for key, src in (getattr(data, "sources", None) or {}).items():
            yield ("stages", i, "data", "sources", key), src


def _matches(pattern: str) -> bool:
    pattern = os.path.expanduser(pattern)
    if glob.has_magic(pattern):
        return next(glob.iglob(pattern, recursive=True), None) is not None
    return os.path.exists(pattern)


def run_checks(sections: Sections, loaded: LoadedSpec, *, check_inputs: bool = True) -> list[SpecIssue]:
    issues: list[SpecIssue] = []
    for needs, fn in CHECKS:
        if all(n in sections for n in needs):
            issues += list(fn(sections, loaded))
    if check_inputs:
        for path, src in _input_fields(sections):
            for j, pattern in enumerate(getattr(src, "paths", None) or []):
                if not _matches(pattern):
                    yield_path = (*path, "paths", j)
                    issues.append(_issue(loaded, yield_path, f"0 files match {pattern!r}",
                                         "fix the path (relative paths resolve against the current directory), or pass --skip-inputs"))
        tok = sections.get("tokenizer")
        if tok is not None and getattr(tok, "name", None) == "pretrained" and not os.path.exists(os.path.expanduser(tok.path)):
            issues.append(_issue(loaded, ("tokenizer", "path"), f"tokenizer file not found: {tok.path}", "point it at a local tokenizer.json or directory"))
    return issues
