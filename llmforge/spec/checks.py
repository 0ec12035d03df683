"""Cross-field checks. Each takes the sections that parsed and returns located issues."""

from __future__ import annotations

import glob
import math
import os
import re
from collections.abc import Callable, Iterator
from typing import Any

from llmforge.spec.errors import SpecIssue, dotted
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
    # The width the model builds: when ffn_hidden_size is omitted, 4 × hidden_size, which need not
    # divide by TP once kv_channels frees hidden_size from the heads.
    ffn = getattr(model, "ffn", getattr(model, "ffn_hidden_size", None))
    if ffn is not None and ffn % tp:
        yield _issue(loaded, ("model", "ffn_hidden_size"), f"ffn_hidden_size {ffn} is not divisible by tensor_model_parallel_size {tp}",
                     "each tensor-parallel rank holds an equal slice of the MLP: use a multiple of the tensor-parallel size")
    vocab = getattr(model, "vocab_size", None)
    if vocab is not None and vocab % tp:
        padded = -(-vocab // (128 * tp)) * 128 * tp
        yield _issue(loaded, ("model", "vocab_size"), f"vocab_size {vocab} is not divisible by tensor_model_parallel_size {tp}",
                     f"pad vocab_size to a multiple of 128 × {tp} (e.g. {padded}), as Megatron-LM does, "
                     "or pick a tensor-parallel size that divides it")
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


@check("model", "parallelism")
def _experts_fit_the_layout(s: Sections, loaded: LoadedSpec) -> Iterator[SpecIssue]:
    """Experts shard over EP and each expert over ETP; the expert layout ETP × EP × PP must tile the world too."""
    model, par = s["model"], s["parallelism"]
    experts, ep = getattr(model, "num_moe_experts", None), par.expert_model_parallel_size
    etp, tp, pp = par.expert_tensor_parallel, par.tensor_model_parallel_size, par.pipeline_model_parallel_size
    if experts is None:
        for key, value, default in (("expert_model_parallel_size", ep, 1), ("expert_tensor_parallel_size", par.expert_tensor_parallel_size, None)):
            if value != default:
                yield _issue(loaded, ("parallelism", key), f"parallelism.{key} {value} splits experts, but model.num_moe_experts is "
                             "null (a dense model)", f"drop parallelism.{key}, or give the model experts (model.num_moe_experts)")
        return
    if experts % ep:
        divisors = [d for d in range(1, experts + 1) if experts % d == 0]
        yield _issue(loaded, ("parallelism", "expert_model_parallel_size"),
                     f"num_moe_experts {experts} is not divisible by expert_model_parallel_size {ep}",
                     f"each expert-parallel rank holds whole experts: use one of {', '.join(map(str, divisors))}")
    if par.world_size % (etp * ep * pp):
        yield _issue(loaded, ("parallelism", "expert_model_parallel_size"),
                     f"world size nnodes × nproc_per_node = {par.world_size} is not divisible by expert tensor × expert × pipeline "
                     f"parallel = {etp} × {ep} × {pp} = {etp * ep * pp}",
                     "the experts are laid out over ETP × EP × expert-DP × PP on the same processes as the dense layers: "
                     "launch a multiple of that, or lower expert_model_parallel_size")
    if tp > 1 and not par.sequence_parallel:
        yield _issue(loaded, ("parallelism", "sequence_parallel"), "MoE layers with tensor_model_parallel_size > 1 need sequence_parallel "
                     "(as in Megatron-LM: the router and dispatchers take each tensor-parallel rank's own tokens)",
                     "set parallelism.sequence_parallel: true")
    moe_ffn = getattr(model, "moe_ffn", None)
    if moe_ffn is not None and moe_ffn % etp:
        yield _issue(loaded, ("model", "moe_ffn_hidden_size"), f"the experts' MLP width {moe_ffn} is not divisible by "
                     f"expert_tensor_parallel_size {etp}", "use a multiple of the expert tensor-parallel size")
    shared = getattr(model, "moe_shared_expert_intermediate_size", None)
    if shared is not None and shared % tp:
        yield _issue(loaded, ("model", "moe_shared_expert_intermediate_size"), f"moe_shared_expert_intermediate_size {shared} is not "
                     f"divisible by tensor_model_parallel_size {tp} (the shared expert is split like the dense MLPs)",
                     "use a multiple of the tensor-parallel size")


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


def _stage_references(stage) -> Iterator[tuple[tuple, str, str]]:
    """(path below the stage, stage name or checkpoint path, what it needs there) of every checkpoint a stage reads."""
    from llmforge.spec.stages import MODEL, REWARD_HEAD

    if getattr(stage, "init_from", None) is not None:
        yield ("init_from",), stage.init_from, MODEL
    if getattr(stage, "reference", None) is not None:
        yield ("reference",), stage.reference, MODEL
    for j, reward in enumerate(getattr(stage, "rewards", None) or ()):
        if getattr(reward, "name", None) == "reward_model":
            yield ("rewards", j, "stage"), reward.stage, REWARD_HEAD


@check("stages")
def _references_name_earlier_stages(s: Sections, loaded: LoadedSpec) -> Iterator[SpecIssue]:
    """init_from, reference and a reward model's stage name an earlier stage (its final checkpoint), or a checkpoint path."""
    earlier: list[str] = []
    raw = loaded.data.get("stages") or []
    names = [x.get("name") if isinstance(x, dict) and isinstance(x.get("name"), str) else None for x in raw]
    for i, stage in enumerate(s["stages"]):
        if stage is None:
            earlier.append(names[i])
            continue
        for where, ref, _ in _stage_references(stage):
            if ref not in earlier and not _is_checkpoint_path(ref):
                why = "it comes later" if ref in names else "no stage has that name"
                yield _issue(loaded, ("stages", i, *where), f"{dotted(where)} {ref!r} must name an earlier stage, but {why}",
                             f"earlier stages: {', '.join(e for e in earlier if e) or 'none'}; or give a checkpoint path")
        earlier.append(stage.name)


@check("stages")
def _references_hold_what_is_read(s: Sections, loaded: LoadedSpec) -> Iterator[SpecIssue]:
    """A stage named by init_from/reference must write model weights, one named by a reward_model reward a reward head."""
    from llmforge.spec.stages import MODEL, REWARD_HEAD, SOFT_PROMPT

    what = {MODEL: "model weights", SOFT_PROMPT: "a soft prompt for a frozen model", REWARD_HEAD: "a reward head"}
    stages = {stage.name: stage for stage in s["stages"] if stage is not None}
    for i, stage in enumerate(s["stages"]):
        for where, ref, needs in _stage_references(stage) if stage is not None else ():
            target = stages.get(ref)
            if target is None or needs in target.checkpoint_holds:
                continue
            if target.checkpoint_holds:
                holds = " and ".join(what.get(h, h) for h in sorted(target.checkpoint_holds))
                why = f"whose checkpoints hold {holds}, not {what[needs]}"
            else:
                why = "which writes no checkpoint"
            hint = ("name a reward_model stage, or a checkpoint one wrote" if needs == REWARD_HEAD else
                    "name a stage that trains the model (for a prompt_tuning stage: its own init_from), or a checkpoint path")
            yield _issue(loaded, ("stages", i, *where), f"{dotted(where)} {ref!r} is a {target.type} stage, {why}", hint)


@check("stages", "parallelism")
def _stage_supports_layout(s: Sections, loaded: LoadedSpec) -> Iterator[SpecIssue]:
    from llmforge.spec.stages import layout_problems

    for i, stage in enumerate(s["stages"]):
        for message in layout_problems(stage, s["parallelism"], model=s.get("model")) if stage is not None else ():
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
    """A pretrain stage's val_loss (any evaluator that needs `val_split`) reads the prepared val split, which val_fraction 0 leaves empty."""
    if s["data"].split.val_fraction > 0:
        return
    for i, stage in enumerate(s["stages"]):
        if getattr(stage, "type", None) != "pretrain":
            continue
        for j, ev in enumerate(stage.evaluators):
            if "val_split" in getattr(ev, "needs", ()):
                yield _issue(loaded, ("data", "split", "val_fraction"),
                             f"data.split.val_fraction is 0, so there is no val split, but stages[{i}] ({stage.name}) lists the {ev.name} "
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


DOCUMENT_OPTIONS = ("reset_position_ids", "reset_attention_mask", "eod_mask_loss")
PACKING_STAGES = ("sft", "lora")


@check("tokenizer", "data")
def _documents_need_an_eod_token(s: Sections, loaded: LoadedSpec) -> Iterator[SpecIssue]:
    """data.reset_* and eod_mask_loss find document boundaries by the end-of-document token, which only a char tokenizer may lack."""
    tok = s["tokenizer"]
    if getattr(tok, "name", None) != "char" or getattr(tok, "add_eos", True):
        return
    for key in DOCUMENT_OPTIONS:
        if getattr(s["data"], key, False):
            yield _issue(loaded, ("data", key),
                         f"data.{key} splits packed windows at the end-of-document token, and the char tokenizer without add_eos adds none",
                         f"set tokenizer.add_eos: true, or turn data.{key} off")


@check("stages")
def _packing_stages(s: Sections, loaded: LoadedSpec) -> Iterator[SpecIssue]:
    """Finetune `packing` runs through the SFT step; the other finetune stages read pairs, soft prompts or rollouts."""
    for i, stage in enumerate(s["stages"]):
        if getattr(stage, "packing", None) is True and getattr(stage, "type", None) not in PACKING_STAGES:
            yield _issue(loaded, ("stages", i, "packing"),
                         f"packing: true is built for stage types {', '.join(PACKING_STAGES)}, not {stage.type!r}",
                         "remove packing from this stage")


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


def _step_length(stage, model) -> int | None:
    """Tokens per sequence a training stage's step reads: max_seq_length (else model.seq_length), plus soft-prompt tokens."""
    length = getattr(stage, "max_seq_length", None) or getattr(model, "seq_length", None)
    virtual = getattr(getattr(stage, "prompt_tuning", None), "num_virtual_tokens", 0)
    return None if length is None else length + virtual


@check("model", "stages")
def _finetune_sequences_fit(s: Sections, loaded: LoadedSpec) -> Iterator[SpecIssue]:
    """max_seq_length plus a soft prompt's virtual tokens fit in the model's positions."""
    positions = getattr(s["model"], "max_positions", None)
    for i, stage in enumerate(s["stages"]):
        given, soft_prompt = getattr(stage, "max_seq_length", None), getattr(stage, "prompt_tuning", None)
        if positions is None or (given is None and soft_prompt is None):
            continue
        length, virtual = _step_length(stage, s["model"]), getattr(soft_prompt, "num_virtual_tokens", 0)
        if length is not None and length > positions:
            what = f"max_seq_length {length - virtual} + {virtual} virtual tokens = {length}" if virtual else f"max_seq_length {length}"
            where = ("max_seq_length",) if given is not None else ("prompt_tuning", "num_virtual_tokens")
            yield _issue(loaded, ("stages", i, *where), f"{what} exceeds the model's {positions} positions (max_position_embeddings)",
                         "lower max_seq_length" + (" or num_virtual_tokens" if virtual else ""))


@check("model", "parallelism", "stages")
def _sequence_parallel_divides_sequences(s: Sections, loaded: LoadedSpec) -> Iterator[SpecIssue]:
    """Sequence parallelism splits every training sequence over the tensor-parallel ranks."""
    par = s["parallelism"]
    tp = par.tensor_model_parallel_size
    if not par.sequence_parallel or tp == 1:
        return
    for i, stage in enumerate(s["stages"]):
        if getattr(stage, "train", None) is None:
            continue
        length = _step_length(stage, s["model"])
        if length is not None and length % tp:
            given = getattr(stage, "max_seq_length", None) is not None
            where = ("stages", i, "max_seq_length") if given else ("model", "seq_length")
            yield _issue(loaded, where, f"stage {stage.name!r} trains on {length}-token sequences, which sequence_parallel splits over "
                         f"tensor_model_parallel_size {tp}: {length} is not divisible by {tp}",
                         f"use a sequence length divisible by {tp}, or turn sequence_parallel off")


@check("stages")
def _rl_budget_in_steps(s: Sections, loaded: LoadedSpec) -> Iterator[SpecIssue]:
    """RL's tokens are known only after sampling, so a token budget cannot size the stage."""
    for i, stage in enumerate(s["stages"]):
        if getattr(stage, "type", None) == "rl" and stage.train.max_tokens is not None:
            yield _issue(loaded, ("stages", i, "train", "max_tokens"),
                         "an rl stage cannot run to max_tokens: its tokens are known only once its completions are sampled",
                         "give the rl stage max_steps or max_epochs")


@check("stages", "parallelism")
def _rollout_groups_per_rank(s: Sections, loaded: LoadedSpec) -> Iterator[SpecIssue]:
    """Each data-parallel rank samples whole groups of completions (their advantages are normalized per group)."""
    par = s["parallelism"]
    if par.world_size % (par.tensor_model_parallel_size * par.pipeline_model_parallel_size):
        return
    dp = par.resolved_data_parallel_size()
    for i, stage in enumerate(s["stages"]):
        group, train = getattr(stage, "group_size", None), getattr(stage, "train", None)
        if group is None or train is None or train.global_batch_size % (train.micro_batch_size * dp):
            continue  # _batch_divides says it
        per_rank = train.global_batch_size // dp
        if per_rank % group:
            step = dp * math.lcm(group, train.micro_batch_size)
            yield _issue(loaded, ("stages", i, "train", "global_batch_size"),
                         f"global_batch_size {train.global_batch_size} gives each of {dp} data-parallel ranks {per_rank} completions, "
                         f"not whole groups of group_size {group}",
                         f"use a multiple of data-parallel size × lcm(group_size, micro_batch_size) = {step}")


@check("model", "stages")
def _rollouts_leave_room_for_prompts(s: Sections, loaded: LoadedSpec) -> Iterator[SpecIssue]:
    """A rollout's prompt and completion fit in max_seq_length + 1 tokens; every prompt has at least one token besides."""
    for i, stage in enumerate(s["stages"]):
        new_tokens = getattr(stage, "max_new_tokens", None)
        length = _step_length(stage, s["model"]) if getattr(stage, "group_size", None) is not None else None
        if new_tokens is not None and length is not None and new_tokens >= length:
            yield _issue(loaded, ("stages", i, "max_new_tokens"),
                         f"max_new_tokens {new_tokens} leaves no room for a prompt: prompt and completion share "
                         f"max_seq_length + 1 = {length + 1} tokens",
                         f"lower max_new_tokens (well below {length}) or raise max_seq_length")


@check("stages")
def _prompt_init_text_needs_vocab_init(s: Sections, loaded: LoadedSpec) -> Iterator[SpecIssue]:
    """init_text picks the word embeddings a soft prompt starts from; `init: random` draws it instead."""
    for i, stage in enumerate(s["stages"]):
        opts = getattr(stage, "prompt_tuning", None)
        if opts is not None and opts.init_text is not None and opts.init == "random":
            yield _issue(loaded, ("stages", i, "prompt_tuning", "init_text"),
                         "init_text starts the soft prompt from its tokens' embeddings, but init: random draws it from a normal distribution",
                         "set prompt_tuning.init: vocab to use init_text, or remove init_text")


@check("stages", "parallelism")
def _distributed_optimizer_needs_adamw(s: Sections, loaded: LoadedSpec) -> Iterator[SpecIssue]:
    """megatron's DistributedOptimizer shards Adam's state; it has no sharding for other optimizers."""
    if not s["parallelism"].use_distributed_optimizer:
        return
    for i, stage in enumerate(s["stages"]):
        name = getattr(getattr(getattr(stage, "train", None), "optimizer", None), "name", None)
        if name is not None and name != "adamw":
            yield _issue(loaded, ("stages", i, "train", "optimizer", "name"),
                         f"parallelism.use_distributed_optimizer shards AdamW's state only (megatron's DistributedOptimizer), "
                         f"but stage {stage.name!r} uses optimizer {name!r}",
                         "set parallelism.use_distributed_optimizer: false, or use optimizer adamw")


@check("stages")
def _chat_template_is_known(s: Sections, loaded: LoadedSpec) -> Iterator[SpecIssue]:
    """A chat template is a built-in's name, `tokenizer`, or a string with both placeholders."""
    from llmforge.spec.stages import CHAT_TEMPLATES, TOKENIZER_TEMPLATE

    for i, stage in enumerate(s["stages"]):
        template = getattr(stage, "chat_template", None)
        if template is None or template in (*CHAT_TEMPLATES, TOKENIZER_TEMPLATE) or ("{prompt}" in template and "{response}" in template):
            continue
        yield _issue(loaded, ("stages", i, "chat_template"),
                     f"chat_template {template!r} is neither a built-in ({', '.join(CHAT_TEMPLATES)}), `{TOKENIZER_TEMPLATE}`, "
                     "nor a string with {prompt} and {response}",
                     "write e.g. '### Question: {prompt}\\n### Answer: {response}'")


@check("tokenizer", "stages")
def _tokenizer_template_has_a_tokenizer(s: Sections, loaded: LoadedSpec) -> Iterator[SpecIssue]:
    """`chat_template: tokenizer` reads the template in an imported tokenizer's files; llmforge's own tokenizers have none."""
    from llmforge.spec.stages import TOKENIZER_TEMPLATE

    name = getattr(s["tokenizer"], "name", None)
    if name == "pretrained" or name is None:
        return  # whether its files hold a template is an input check (run_checks)
    for i, stage in enumerate(s["stages"]):
        if getattr(stage, "chat_template", None) == TOKENIZER_TEMPLATE:
            yield _issue(loaded, ("stages", i, "chat_template"),
                         f"chat_template: {TOKENIZER_TEMPLATE} renders the tokenizer's own chat template, but the run's {name} "
                         "tokenizer is llmforge's own and has none",
                         "use tokenizer: {name: pretrained, path: <HF tokenizer folder with a chat template>}, or a chat_template of "
                         "llmforge's own (default, plain, or a '{prompt}/{response}' string)")


@check("stages")
def _last_turn_needs_conversations(s: Sections, loaded: LoadedSpec) -> Iterator[SpecIssue]:
    """train_on_turns picks turns of `messages` records; a stage that reads none would ignore it."""
    from llmforge.spec.stages import CHAT

    for i, stage in enumerate(s["stages"]):
        if getattr(stage, "train_on_turns", "all") != "all" and CHAT not in getattr(stage, "reads_records", ()):
            yield _issue(loaded, ("stages", i, "train_on_turns"),
                         f"train_on_turns: {stage.train_on_turns} picks assistant turns of `messages` records, but a {stage.type} stage "
                         "reads single-turn records", "remove train_on_turns from this stage")


@check("data", "model", "stages")
def _prepare_has_input(s: Sections, loaded: LoadedSpec) -> Iterator[SpecIssue]:
    """A prepare stage tokenizes data.sources, which must yield plain documents, into samples of seq_length + 1."""
    prepare = next((i for i, stage in enumerate(s["stages"]) if getattr(stage, "type", None) == "prepare"), None)
    if prepare is None:
        return
    data = s["data"]
    if not data.sources:
        yield SpecIssue(("data", "sources"), f"data.sources is empty, so stages[{prepare}] (prepare) has nothing to tokenize",
                        "add a source, e.g. data.sources.web: {name: text, paths: [corpus/*.txt]}, or remove the prepare stage",
                        loaded.locate(("data", "sources")) if "data" in loaded.data else loaded.locate(("stages", prepare)))
    if getattr(s["model"], "seq_length", None) is None:
        yield _issue(loaded, ("model",), f"model {s['model'].name!r} has no seq_length, which the prepare stage packs samples by",
                     "use a model with a seq_length, or remove the prepare stage")
    for key, src in data.sources.items():
        fields = getattr(src, "record_fields", None)
        if fields:
            yield _issue(loaded, ("data", "sources", key), f"data.sources.{key} ({src.name}) yields finetune records "
                         f"({', '.join(sorted(fields))}), which prepare cannot pack into pretraining shards",
                         "use this source under a finetune stage's data.sources (or a tasks source with format: text)")


@check("stages")
def _sources_yield_what_the_stage_reads(s: Sections, loaded: LoadedSpec) -> Iterator[SpecIssue]:
    """Each finetune source yields the records its stage reads (and its rewards' fields), where the source says what it yields."""
    for i, stage in enumerate(s["stages"]):
        wants = getattr(stage, "reads_records", None)
        data = getattr(stage, "data", None) if stage is not None else None
        if not wants or data is None:
            continue
        want = " or ".join("{" + ", ".join(sorted(w)) + "}" for w in wants)
        for key, src in data.sources.items():
            fields = getattr(src, "record_fields", None)
            if fields is None:
                continue  # a plugin source that does not say
            path = ("stages", i, "data", "sources", key)
            if not fields:
                yield _issue(loaded, path, f"source {key!r} ({src.name}) yields plain documents, but a {stage.type} stage trains on "
                             f"records with {want}", "use an `instructions`, `preferences` or `tasks` source")
            elif not any(w <= fields for w in wants):
                yield _issue(loaded, path, f"source {key!r} ({src.name}) yields records with {{{', '.join(sorted(fields))}}}, "
                             f"but a {stage.type} stage reads records with {want}", _record_hint(wants))
            else:
                for j, reward in enumerate(getattr(stage, "rewards", None) or ()):
                    field = getattr(reward, "field", None)
                    if field is not None and field not in fields:
                        yield _issue(loaded, ("stages", i, "rewards", j, "field"),
                                     f"the {reward.name} reward reads field {field!r}, but source {key!r} ({src.name}) yields records "
                                     f"with {{{', '.join(sorted(fields))}}}", "name a field the records have (the reference answer)")


def _record_hint(wants: tuple[frozenset[str], ...]) -> str:
    if any("chosen" in w for w in wants):
        return "use a `preferences` source, or a `tasks` source with format: preferences"
    if any("messages" in w for w in wants):
        return "use an `instructions` source, or a `tasks` source with format: instructions"
    return "use `prompt`/`response` records: an `instructions` source with format: prompt_response, or a `tasks` source"


STAGES_OFFERING = {"logprobs": "dpo, prompt_tuning, rl", "reward_scores": "reward_model", "rewards": "rl"}


@check("stages")
def _evaluators_fit_their_stage(s: Sections, loaded: LoadedSpec) -> Iterator[SpecIssue]:
    """An evaluator that needs what its stage does not offer would report nothing; refuse it instead."""
    for i, stage in enumerate(s["stages"]):
        offers = getattr(stage, "offers", frozenset())
        for j, ev in enumerate(getattr(stage, "evaluators", None) or ()):
            # A val split is not offered by the stage type but by its data (_val_split_for_val_readers).
            missing = sorted(getattr(ev, "needs", frozenset()) - offers - {"val_split"})
            if missing:
                where = "; ".join(f"{m}: {STAGES_OFFERING.get(m, 'none built in')}" for m in missing)
                yield _issue(loaded, ("stages", i, "evaluators", j, "name"),
                             f"the {ev.name} evaluator needs {', '.join(missing)}, which a {stage.type} stage does not offer",
                             f"list it under a stage that does ({where}), or remove it from stages[{i}].evaluators")


@check("stages")
def _evaluator_metric_keys_are_unique(s: Sections, loaded: LoadedSpec) -> Iterator[SpecIssue]:
    """Two evaluators of a stage that declare the same metric key would write one column twice."""
    for i, stage in enumerate(s["stages"]):
        declared: dict[str, tuple[int, str]] = {}
        for j, ev in enumerate(getattr(stage, "evaluators", None) or ()):
            for key in getattr(ev, "metric_keys", ()):
                if key in declared:
                    first, name = declared[key]
                    yield _issue(loaded, ("stages", i, "evaluators", j, "name"),
                                 f"the {ev.name} evaluator returns the metric {key!r}, which stages[{i}].evaluators[{first}] "
                                 f"({name}) returns too", f"keep one of them in stages[{i}].evaluators")
                    break
                declared[key] = (j, ev.name)


def _input_fields(s: Sections) -> Iterator[tuple[tuple, Any]]:
    """(path, options) of every component that reads input files (sources, and evaluators with `paths`)."""
    if "data" in s:
        for key, src in s["data"].sources.items():
            yield ("data", "sources", key), src
    for i, stage in enumerate(s.get("stages") or []):
        data = getattr(stage, "data", None) if stage is not None else None
        for key, src in (getattr(data, "sources", None) or {}).items():
            yield ("stages", i, "data", "sources", key), src
        for j, evaluator in enumerate(getattr(stage, "evaluators", None) or []):
            yield ("stages", i, "evaluators", j), evaluator


def _matches(pattern: str) -> bool:
    """Whether a local pattern names a file; `pipe:` commands and URLs are never run or opened here (always true)."""
    if pattern.startswith("pipe:") or re.match(r"^[a-z][a-z0-9+.-]*://", pattern, re.I) and not pattern.startswith("file://"):
        return True
    pattern = os.path.expanduser(pattern.removeprefix("file://"))
    if not os.path.exists(pattern) and re.search(r"\{[^{}]*(,|\.\.)[^{}]*\}", pattern):  # a WebDataset brace pattern: every shard it names must exist
        import braceexpand

        return all(_matches(p) for p in braceexpand.braceexpand(pattern))
    if glob.has_magic(pattern):
        return next(glob.iglob(pattern, recursive=True), None) is not None
    return os.path.exists(pattern)


def run_checks(sections: Sections, loaded: LoadedSpec, *, check_inputs: bool = True) -> list[SpecIssue]:
    issues: list[SpecIssue] = []
    for needs, fn in CHECKS:
        if all(n in sections for n in needs):
            issues += list(fn(sections, loaded))
    if check_inputs:
        issues += list(checks_precision.machine_issues(sections, loaded))
        issues += list(checks_lm_eval.input_issues(sections, loaded))
        for path, src in _input_fields(sections):
            for j, pattern in enumerate(getattr(src, "paths", None) or []):
                if not _matches(pattern):
                    yield_path = (*path, "paths", j)
                    issues.append(_issue(loaded, yield_path, f"0 files match {pattern!r}",
                                         "fix the path (relative paths resolve against the current directory), or pass --skip-inputs"))
            if getattr(src, "name", None) == "hf_dataset" and not os.path.isdir(os.path.expanduser(src.path)):
                issues.append(_issue(loaded, (*path, "path"), f"dataset folder not found: {src.path!r}",
                                     "point it at a folder written by save_to_disk or holding Parquet/JSONL files, or pass --skip-inputs"))
        tok = sections.get("tokenizer")
        if tok is not None and getattr(tok, "name", None) == "pretrained" and not os.path.exists(os.path.expanduser(tok.path)):
            issues.append(_issue(loaded, ("tokenizer", "path"), f"tokenizer file not found: {tok.path}", "point it at a local tokenizer.json or directory"))
        elif tok is not None and getattr(tok, "name", None) == "pretrained":
            issues += _tokenizer_template_problems(sections, loaded, tok.path)
        for i, stage in enumerate(sections.get("stages") or []):
            for where, ref, _ in _stage_references(stage) if stage is not None else ():
                if _is_checkpoint_path(ref) and not os.path.isdir(ref):
                    issues.append(_issue(loaded, ("stages", i, *where), f"checkpoint not found: {ref}",
                                         "point it at a checkpoint directory (<run dir>/checkpoints/<stage>/step-N), or pass --skip-inputs"))
    return issues


def _tokenizer_template_problems(sections: Sections, loaded: LoadedSpec, path: str) -> list[SpecIssue]:
    """Render a probe conversation with the tokenizer's own template for each stage that uses it: a tokenizer
    without a template, or a template whose assistant turns cannot be found, is refused before any run."""
    from pathlib import Path

    from llmforge.spec.errors import UserError
    from llmforge.spec.stages import TOKENIZER_TEMPLATE

    users = [i for i, stage in enumerate(sections.get("stages") or []) if getattr(stage, "chat_template", None) == TOKENIZER_TEMPLATE]
    if not users:
        return []
    from llmforge.data.chat_template import probe
    from llmforge.data.pretrained import load_pretrained

    try:
        probe(load_pretrained(Path(path).expanduser()))
    except UserError as e:
        return [_issue(loaded, ("stages", i, "chat_template"), f"tokenizer {path}: {e.args[0]}", e.hint) for i in users]
    return []


# Checks kept in modules of their own register on import (this one is imported by validate).
from llmforge.spec import checks_lm_eval, checks_precision  # noqa: E402,F401
