"""Options models of the built-in stage types. The registry adds each one's `type` literal."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from llmforge.spec.base import EvaluatorRef, LRScheduleRef, OptimizerRef, RewardRef, SourceRef, StrictModel, field_error


class SpikeConfig(StrictModel):
    """When a finite loss counts as a spike: far above the running mean of recent losses."""

    window: int = Field(100, ge=2, description="Recent non-spike losses the running mean and standard deviation are taken over.")
    warmup_steps: int = Field(20, ge=2, description="Losses recorded before any step is judged (the first steps fall too fast to judge).")
    max_deviations: float = Field(6.0, gt=0, description="A loss is a spike when it is more than this many standard deviations above the running mean, and above min_ratio × the mean.")
    min_ratio: float = Field(1.5, gt=1.0, description="A spike must also exceed this multiple of the running mean, so that noise on a flat curve (a tiny deviation) is never flagged.")
    max_consecutive: int = Field(
        5, ge=1, description="This many spikes in a row stop the run under `skip`: the loss has moved, and skipping would only burn steps."
    )

    @model_validator(mode="after")
    def _warmup_fits(self) -> SpikeConfig:
        if self.warmup_steps > self.window:
            raise field_error(SpikeConfig, "warmup_steps", self.warmup_steps,
                              f"warmup_steps {self.warmup_steps} exceeds window {self.window}: no step would ever be judged")
        return self


class TrainConfig(StrictModel):
    """The optimization loop of a training stage (pretrain, sft, ...)."""

    micro_batch_size: int = Field(..., ge=1, description="Sequences per forward/backward on one data-parallel rank.")
    global_batch_size: int = Field(
        ...,
        ge=1,
        description="Sequences per optimizer step over all ranks. Gradient-accumulation steps = global / (micro × data-parallel size), which must divide exactly.",
    )
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps. Give exactly one of max_steps, max_tokens, max_epochs.")
    max_tokens: int | None = Field(None, ge=1, description="Stop after this many training tokens (rounded up to whole steps).")
    max_epochs: float | None = Field(None, gt=0, description="Stop after this many passes over the training split.")
    optimizer: OptimizerRef = Field(default_factory=lambda: {"name": "adamw"}, description="Optimizer component, e.g. `{name: adamw, lr: 3.0e-4}`.")
    lr_schedule: LRScheduleRef = Field(
        default_factory=lambda: {"name": "cosine"}, description="Learning-rate schedule component, e.g. `{name: cosine, warmup_steps: 100}`."
    )
    clip_grad: float | None = Field(1.0, gt=0, description="Clip the global gradient norm to this value; None disables clipping.")
    precision: Literal["fp32", "bf16", "bf16-autocast", "fp8"] = Field(
        "fp32",
        description="`bf16`: megatron's mixed precision, as Megatron-LM's `--bf16`: bf16 weights and activations, fp32 gradients, "
        "fp32 master weights and optimizer state (2 + 4 + 12 bytes per parameter; the 12 shard over data-parallel ranks with "
        "the distributed optimizer). `bf16-autocast`: fp32 weights, bf16 compute under torch autocast (4 + 4 + 8 bytes, "
        "nothing sharded but the 8): less memory without the distributed optimizer, numerics closer to fp32. `fp8`: `bf16` "
        "with the transformer layers' matmuls in FP8 through TransformerEngine (Megatron-LM's `--bf16 --fp8-format`; CUDA "
        "with the `fp8` extra only; the fp8_* fields set its recipe). docs/architecture.md, \"Precision\", says when to use which.",
    )
    fp8_format: Literal["hybrid", "e4m3"] | None = Field(
        None, description="Only with precision: fp8 (Megatron-LM's `--fp8-format`; default `hybrid`): `hybrid` keeps weights and "
        "activations in E4M3 and gradients in E5M2; `e4m3` uses E4M3 for all three.")
    fp8_recipe: Literal["delayed", "tensorwise", "blockwise", "mxfp8"] | None = Field(
        None, description="Only with precision: fp8 (Megatron-LM's `--fp8-recipe`; default `delayed`): how scaling factors are "
        "chosen. `delayed` from an amax history, `tensorwise` from the current tensor, `blockwise` per 128-element block, "
        "`mxfp8` per 32 elements (Blackwell GPUs only).")
    fp8_margin: int | None = Field(None, ge=0, description="Only with precision: fp8 (`--fp8-margin`; default 0): scale by "
                                   "2^-margin below the largest representable value, headroom for amax growth.")
    fp8_amax_history_len: int | None = Field(None, ge=1, description="Only with the `delayed` recipe (`--fp8-amax-history-len`; "
                                             "default 1): steps of amax history the scale is chosen from.")
    fp8_amax_compute_algo: Literal["most_recent", "max"] | None = Field(
        None, description="Only with the `delayed` recipe (`--fp8-amax-compute-algo`; default `most_recent`): the amax of the "
        "history window the scale uses.")
    fp8_wgrad: bool | None = Field(None, description="Only with precision: fp8 (default true): compute weight gradients in FP8 too; "
                                   "false keeps them in bf16 (Megatron-LM's `--no-fp8-wgrad`).")
    eval_interval: int | None = Field(None, ge=1, description="Run the stage's evaluators every this many steps (and at the end). None = only at the end.")
    eval_iters: int = Field(10, ge=1, description="Validation global batches per evaluation: val_loss covers the first "
                            "eval_iters × global_batch_size val samples, in order, at any layout (Megatron-LM's meaning).")
    on_nonfinite: Literal["stop", "skip"] = Field(
        "stop", description="A NaN/Inf loss or gradient: `stop` (weights untouched, non-zero exit) or `skip` the step and count it."
    )
    on_spike: Literal["ignore", "skip", "stop"] = Field(
        "ignore",
        description="A loss spike (see `spike`): `ignore` applies the update and logs a warning; `skip` drops the update and counts it; "
        "`stop` drops it and ends the run (non-zero exit). Judged before the optimizer step.",
    )
    spike: SpikeConfig = Field(default_factory=dict, description="What counts as a loss spike for `on_spike`.")

    FP8_DEFAULTS: ClassVar[dict[str, object]] = {"fp8_format": "hybrid", "fp8_recipe": "delayed", "fp8_margin": 0,
                                                  "fp8_amax_history_len": 1, "fp8_amax_compute_algo": "most_recent", "fp8_wgrad": True}

    def fp8_options(self) -> dict[str, object] | None:
        """Megatron's TransformerConfig fp8 fields for precision fp8 (format under its name `fp8`), else None."""
        if self.precision != "fp8":
            return None
        given = {k: (default if getattr(self, k) is None else getattr(self, k)) for k, default in self.FP8_DEFAULTS.items()}
        return {"fp8": given.pop("fp8_format"), **given}

    @model_validator(mode="after")
    def _fp8_fields_need_fp8(self) -> TrainConfig:
        if self.precision != "fp8":
            for key in self.FP8_DEFAULTS:
                if getattr(self, key) is not None:
                    raise field_error(TrainConfig, key, getattr(self, key),
                                      f"{key} applies only with precision: fp8 (precision is {self.precision}); "
                                      "set precision: fp8, or remove it")
        elif self.fp8_recipe not in (None, "delayed"):
            for key in ("fp8_amax_history_len", "fp8_amax_compute_algo"):
                if getattr(self, key) is not None:
                    raise field_error(TrainConfig, key, getattr(self, key),
                                      f"{key} applies only to the delayed recipe (fp8_recipe is {self.fp8_recipe}); remove it")
        return self

    @model_validator(mode="after")
    def _one_budget(self) -> TrainConfig:
        given = [k for k in ("max_steps", "max_tokens", "max_epochs") if getattr(self, k) is not None]
        if len(given) != 1:
            got = ", ".join(given) if given else "none"
            raise ValueError(f"give exactly one of max_steps, max_tokens, max_epochs (got {got})")
        return self


MODEL, SOFT_PROMPT, REWARD_HEAD = "model", "soft_prompt", "reward_head"


class StageBase(StrictModel):
    """Fields every stage has."""

    # What the stage's checkpoints hold: `init_from` and `reference` need a model, a reward_model reward a reward head.
    checkpoint_holds: ClassVar[frozenset[str]] = frozenset({MODEL})
    # What its evaluators can ask of the model beyond generation and scoring (the EvalContext
    # fields its StageHooks.evaluation sets); an evaluator that needs more is refused by validate.
    offers: ClassVar[frozenset[str]] = frozenset()
    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$", description="Unique stage name; later stages refer to it with `init_from`.")
    init_from: str | None = Field(None, description="Start from the final checkpoint of this earlier stage (by name).")


class PrepareStage(StageBase):
    """Train or load the tokenizer, tokenize the `data` sources and write WebDataset shards."""

    checkpoint_holds: ClassVar[frozenset[str]] = frozenset()
    packing: Literal["windows", "documents"] = Field(
        "windows", description="`windows`: fixed seq_length+1 token windows across documents; `documents`: keep document boundaries."
    )


class PretrainStage(StageBase):
    """Next-token pretraining on the prepared shards."""

    train: TrainConfig = Field(..., description="Batch, budget, optimizer and schedule.")
    evaluators: list[EvaluatorRef] = Field(
        default_factory=lambda: [{"name": "val_loss"}], description="Evaluators run every eval_interval steps and at the end of the stage."
    )


def val_split_readers(stage) -> list[str]:
    """Names of the stage's evaluators that read its val split (validate and the stages refuse them without one).

    An evaluator says so on its `Component` (`needs={"val_split"}`); the others bring their own held-out data.
    """
    return [ev.name for ev in getattr(stage, "evaluators", None) or () if "val_split" in getattr(ev, "needs", ())]


class SFTData(StrictModel):
    """Instruction data of a finetune stage."""

    sources: dict[str, SourceRef] = Field(..., min_length=1, description="Named instruction sources, e.g. `{name: instructions, paths: [...]}`.")
    val_fraction: float = Field(0.05, ge=0.0, lt=1.0, description="Fraction of examples held out for validation. "
                                "0 = none: the stage then never evaluates on a val split, and may not list `val_loss`.")


# The built-in chat templates (their text is in llmforge.data.sft.TEMPLATES; a test keeps the two equal).
CHAT_TEMPLATES = ("default", "plain")
TOKENIZER_TEMPLATE = "tokenizer"  # the tokenizer's own Jinja template (llmforge.data.chat_template)

PROMPT_RESPONSE, CHAT, PREFERENCE = frozenset({"prompt", "response"}), frozenset({"messages"}), frozenset({"prompt", "chosen", "rejected"})


class SFTStage(StageBase):
    """Supervised finetuning: loss only on response tokens, through a chat template."""

    # The records the stage trains on: every field of one of these sets (sources say what they yield).
    reads_records: ClassVar[tuple[frozenset[str], ...]] = (PROMPT_RESPONSE, CHAT)
    data: SFTData = Field(..., description="Instruction or chat data.")
    chat_template: str = Field(
        "default", description="`tokenizer`: the tokenizer's own Jinja chat template (tokenizer_config.json's `chat_template` or "
        "chat_template.jinja), rendered as transformers' `apply_chat_template` renders it; a built-in (`default`, `plain`); or a "
        "string with {prompt} and {response}. Every record, evaluator prompt and rollout prompt of the stage goes through it "
        "(docs/finetuning.md, \"Chat templates\")."
    )
    train_on_turns: Literal["all", "last"] = Field(
        "all", description="Which assistant turns of a `messages` record train: `all` (each turn's content and the end-of-turn "
        "token closing it: TRL's `assistant_only_loss=True`, Axolotl's `roles_to_train: [assistant]` with `train_on_eos: turn`) "
        "or `last` (the last assistant turn and its end-of-turn token only; Axolotl: `training: false` on every earlier "
        "message). Named after Axolotl's `train_on_eos`. Only stages that read `messages` records may set `last`."
    )
    max_seq_length: int | None = Field(
        None, ge=8, description="Pad or truncate every example to this many tokens (≤ model.seq_length); None = model.seq_length. Short tasks train much faster."
    )
    packing: bool = Field(
        False, description="Several examples per sequence (TRL's `packing`, Axolotl's `sample_packing`), each attending only to "
        "itself (block-causal mask), with positions restarting per example and its own loss mask. `sft` and `lora` stages only."
    )
    train: TrainConfig = Field(..., description="Batch, budget, optimizer and schedule.")
    evaluators: list[EvaluatorRef] = Field(
        default_factory=lambda: [{"name": "val_loss"}], description="Evaluators run every eval_interval steps and at the end of the stage."
    )


# --- finetune stages beyond SFT -----------------------------------------------------------
# Stages whose step cannot run under a layout say so in `parallelism_limits`; `validate`
# refuses the spec (checks.py) and the stage refuses it again at run time.

PIPELINE, SEQUENCE_PARALLEL = "pipeline_model_parallel_size", "sequence_parallel"


def layout_problems(stage, parallelism, *, model=None) -> list[str]:
    """Why `stage` cannot run with `parallelism` (and `model`, when it parsed), one message per unsupported setting."""
    limits = getattr(stage, "parallelism_limits", ())
    problems = []
    if PIPELINE in limits and parallelism.pipeline_model_parallel_size > 1:
        problems.append(f"stage type {stage.type!r} does not support pipeline_model_parallel_size > 1 yet "
                        f"(got {parallelism.pipeline_model_parallel_size}); it runs at any tensor- and data-parallel size")
    if SEQUENCE_PARALLEL in limits and parallelism.sequence_parallel:
        problems.append(f"stage type {stage.type!r} does not support sequence_parallel yet (its sampler decodes one token at a time)")
    lora = getattr(stage, "lora", None)
    mlp_targets = lora is not None and {"linear_fc1", "linear_fc2"} & set(lora.target_modules)
    if mlp_targets and getattr(model, "num_moe_experts", None) and parallelism.expert_tensor_parallel > 1:
        # Each routed expert's adapter is whole on its rank, as the expert is at expert_tensor_parallel_size 1.
        problems.append(f"LoRA on the experts' linear_fc1/linear_fc2 needs parallelism.expert_tensor_parallel_size 1 (got "
                        f"{parallelism.expert_tensor_parallel}); set it to 1, or adapt only linear_qkv and linear_proj")
    return problems


class _NeedsInitFrom:
    @model_validator(mode="after")
    def _init_from_given(self):
        if self.init_from is None:
            raise field_error(type(self), "init_from", None, f"stage type {getattr(self, 'type', 'finetune')!r} starts from a trained model: "
                              "give init_from (an earlier stage's name, or a checkpoint path)")
        return self


class LoRAConfig(StrictModel):
    """Low-rank adapters on megatron's linear layers; every base weight stays frozen."""

    rank: int = Field(8, ge=1, description="Rank r of each adapter: the update is B A with A r × in and B out × r.")
    alpha: float = Field(16.0, gt=0, description="The update is scaled by alpha / rank.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on each adapter's input.")
    target_modules: list[Literal["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]] = Field(
        default_factory=lambda: ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"], min_length=1,
        description="Linears that get adapters: attention QKV and output projection, MLP fc1 and fc2.",
    )
    merge: bool = Field(
        True, description="Also write the merged full model into the stage's final checkpoint, for `init_from` and "
        "`llmforge export hf`. The checkpoints hold the adapters alone either way; `init_from` merges them on the fly.",
    )


class LoRAStage(_NeedsInitFrom, SFTStage):
    """Supervised finetuning of LoRA adapters (response-only loss, chat template); the base model frozen."""

    lora: LoRAConfig = Field(default_factory=dict, description="Adapter rank, scale, dropout, target linears and merging.")


class PromptTuningConfig(StrictModel):
    """Learned soft-prompt vectors in front of every sequence; the whole model frozen."""

    num_virtual_tokens: int = Field(8, ge=1, description="Soft-prompt vectors (each takes one position of max_seq_length's budget on top).")
    init: Literal["vocab", "random"] = Field(
        "vocab", description="`vocab`: start from word embeddings (of init_text's tokens, else of seeded random tokens); `random`: normal(0, init std)."
    )
    init_text: str | None = Field(None, description="Text whose token embeddings start the soft prompt (cycled to num_virtual_tokens); "
                                  "only with init: vocab.")


class PromptTuningStage(_NeedsInitFrom, SFTStage):
    """Prompt tuning on instruction data: only the soft prompt trains; checkpoints hold it alone."""

    checkpoint_holds: ClassVar[frozenset[str]] = frozenset({SOFT_PROMPT})
    offers: ClassVar[frozenset[str]] = frozenset({"logprobs"})
    prompt_tuning: PromptTuningConfig = Field(default_factory=dict, description="Number of virtual tokens and their initialization.")


class PreferenceData(SFTData):
    """Preference pairs of a stage: sources of `prompt`, `chosen` and `rejected` records."""

    sources: dict[str, SourceRef] = Field(..., min_length=1, description="Named preference sources, e.g. `{name: preferences, paths: [...]}` or `{name: tasks, format: preferences}`.")


class DPOStage(_NeedsInitFrom, SFTStage):
    """Direct preference optimization against a frozen reference model (sigmoid loss, or IPO)."""

    reads_records: ClassVar[tuple[frozenset[str], ...]] = (PREFERENCE,)
    offers: ClassVar[frozenset[str]] = frozenset({"logprobs", "reference_logprobs"})
    data: PreferenceData = Field(..., description="Preference pairs.")
    beta: float = Field(0.1, gt=0, description="Strength of the implicit KL constraint to the reference (DPO's beta).")
    loss: Literal["sigmoid", "ipo"] = Field("sigmoid", description="`sigmoid`: DPO's −log σ(β h); `ipo`: IPO's (h − 1/(2β))².")
    reference: str | None = Field(None, description="Stage (or checkpoint path) of the frozen reference model; None = init_from.")


class RewardModelStage(_NeedsInitFrom, SFTStage):
    """A reward model: the GPT with a scalar head on its last token, trained on preference pairs (Bradley-Terry)."""

    reads_records: ClassVar[tuple[frozenset[str], ...]] = (PREFERENCE,)
    checkpoint_holds: ClassVar[frozenset[str]] = frozenset({MODEL, REWARD_HEAD})
    offers: ClassVar[frozenset[str]] = frozenset({"reward_scores"})
    data: PreferenceData = Field(..., description="Preference pairs.")


class RLStage(_NeedsInitFrom, SFTStage):
    """Reinforcement learning, GRPO-style: G sampled completions per prompt, group-normalized rewards,
    a clipped policy-gradient objective and a KL penalty to the frozen reference model.

    `train.global_batch_size` counts completions (prompts per step × group_size); a step is
    one rollout, followed by `updates_per_rollout` optimizer updates on it.
    """

    offers: ClassVar[frozenset[str]] = frozenset({"rewards", "logprobs", "reference_logprobs"})
    reads_records: ClassVar[tuple[frozenset[str], ...]] = (frozenset({"prompt"}),)  # and what its rewards read
    data: SFTData = Field(..., description="Prompts with reference answers (`prompt`/`response` records), e.g. a `tasks` source.")
    rewards: list[RewardRef] = Field(..., min_length=1, description="Reward components, summed with their weights, e.g. `[{name: exact_match}]`.")
    group_size: int = Field(4, ge=2, description="Completions sampled per prompt (G); advantages are normalized within each group.")
    max_new_tokens: int = Field(16, ge=1, description="Longest completion; sampling also stops at end-of-sequence.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of the rollouts. The policy, old and reference log-probs are "
                               "taken at it too (log softmax of logits / temperature), as TRL does.")
    top_k: int | None = Field(None, ge=1, description="Sample only from the k most likely tokens; None = all. Sampling only: as in TRL, the "
                              "log-probs are those of the whole tempered distribution.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling: the smallest set of tokens with this much probability. Sampling "
                         "only, like top_k.")
    clip_epsilon: float = Field(0.2, gt=0, lt=1, description="PPO clip range of the probability ratio.")
    kl_coef: float = Field(0.04, ge=0, description="Weight of the per-token KL penalty to the reference model (0 = none, and no reference forward).")
    scale_rewards: bool = Field(True, description="Divide advantages by the group's reward std (GRPO); false keeps them centered only (Dr. GRPO).")
    updates_per_rollout: int = Field(1, ge=1, description="Optimizer updates on each rollout (GRPO's μ); the clip matters from the second on. "
                                     "A vetoed update (non-finite, or a spike under on_spike: skip|stop) ends its rollout's updates.")
    reference: str | None = Field(None, description="Stage (or checkpoint path) of the frozen reference model; None = init_from.")

    @model_validator(mode="after")
    def _groups_fit(self) -> RLStage:
        if self.train.global_batch_size % self.group_size:
            raise field_error(RLStage, ("train", "global_batch_size"), self.train.global_batch_size,
                              f"global_batch_size {self.train.global_batch_size} completions do not split into groups of {self.group_size}; "
                              f"use a multiple of group_size")
        return self
