"""The spec's top-level sections. Key names follow Megatron-LM, which our users know."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from llmforge.spec.base import (
    CallbackRef,
    ModelRef,
    SourceRef,
    StageRef,
    StrictModel,
    TokenizerRef,
    field_error,
)

SCHEMA_VERSION = 1


class SplitConfig(StrictModel):
    """How prepared tokens are split into train and val."""

    by: Literal["document", "contiguous"] = Field(
        "document",
        description="`document`: a seeded random choice of whole documents goes to val (the default). "
        "`contiguous`: the last `val_fraction` of the token stream is val, as nanoGPT does for one file.",
    )
    val_fraction: float = Field(0.05, ge=0.0, lt=1.0, description="Fraction of documents (or tokens, for `contiguous`) held out for validation.")


class DataConfig(StrictModel):
    """Pretraining data: named sources, their mixture, and how they become shards."""

    sources: dict[str, SourceRef] = Field(
        default_factory=dict,
        description="Named data sources, each a registered source component, e.g. `web: {name: text, paths: [...]}`.",
    )
    mix: dict[str, float] | None = Field(
        None,
        description="Sampling weights per source name, e.g. `{web: 0.7, code: 0.3}`. Omit to take every source once, in full.",
    )
    split: SplitConfig = Field(default_factory=dict, description="The train/val split.")
    shard_size_mb: float = Field(64.0, gt=0, description="Target size of one WebDataset tar shard, in MiB.")
    num_workers: int = Field(0, ge=0, description="Tokenizer worker processes of each process of `prepare`; 0 = this machine's cores divided among the job's processes on it.")
    on_error: Literal["raise", "skip"] = Field(
        "raise", description="Bad input (undecodable file, corrupt shard): `raise` stops with the file or shard named; `skip` logs, counts and goes on."
    )
    on_change: Literal["rebuild", "refuse"] = Field(
        "rebuild", description="When the inputs of existing shards changed: `rebuild` them, or `refuse` and stop. They are never mixed."
    )
    # Megatron-LM's GPTDatasetConfig names; documents end with the tokenizer's end-of-document token.
    reset_position_ids: bool = Field(
        False, description="Positions restart at 0 after each end-of-document token of a packed window (RoPE and learned positions alike).")
    reset_attention_mask: bool = Field(
        False, description="Block-causal attention: each token of a packed window attends only to earlier tokens of its own document "
        "(torchtitan's document masking). Costs a [micro_batch, seq, seq] mask per micro batch (the plan counts it).")
    eod_mask_loss: bool = Field(
        False, description="The target read at an end-of-document token (the next document's first token) carries no loss.")

    @model_validator(mode="after")
    def _mix_weights(self) -> DataConfig:
        # Unknown names in `mix` are reported by checks.py, with the list of sources.
        for key, weight in (self.mix or {}).items():
            if weight <= 0:
                raise field_error(DataConfig, ("mix", key), weight, f"mix weight {weight} of {key!r} must be positive; remove the source to leave it out")
        missing = [name for name in self.sources if self.mix is not None and name not in self.mix]
        if missing:
            raise field_error(DataConfig, ("mix",), self.mix, f"mix gives no weight to source {', '.join(map(repr, missing))}; weigh every source")
        return self


class ParallelismConfig(StrictModel):
    """How the model and data are split over devices (Megatron's names)."""

    tensor_model_parallel_size: int = Field(1, ge=1, description="Tensor-parallel ranks each layer's matrices are split across.")
    pipeline_model_parallel_size: int = Field(1, ge=1, description="Pipeline stages the layers are split across.")
    virtual_pipeline_model_parallel_size: int | None = Field(
        None, ge=1, description="Model chunks per pipeline rank (interleaved schedule). Needs pipeline_model_parallel_size > 1."
    )
    data_parallel_size: int | Literal["auto"] = Field(
        "auto", description="Data-parallel replicas; `auto` = world size / (tensor × pipeline)."
    )
    expert_model_parallel_size: int = Field(
        1, ge=1, description="Expert-parallel ranks each MoE layer's experts are split across (EP); needs model.num_moe_experts. "
        "Experts are laid out over ETP × EP × expert-DP × PP, the other layers over TP × DP × PP, on the same processes.")
    expert_tensor_parallel_size: int | None = Field(
        None, ge=1, description="Tensor-parallel ranks each expert's matrices are split across (ETP); null = tensor_model_parallel_size.")
    sequence_parallel: bool = Field(False, description="Split norms and dropout along the sequence over the TP group (needs TP > 1).")
    recompute_granularity: Literal["none", "selective", "full"] = Field(
        "none", description="Activation recompute: `selective` recomputes attention internals, `full` whole layers."
    )
    use_distributed_optimizer: bool = Field(
        False, description="Shard optimizer state over data-parallel ranks (ZeRO-1, Megatron's DistributedOptimizer). AdamW only: "
        "every training stage must use the adamw optimizer."
    )
    nnodes: int = Field(1, ge=1, description="Machines in the job.")
    nproc_per_node: int = Field(1, ge=1, description="Processes (GPUs, or CPU ranks) per machine. Where the spec sets no layout "
                                "field, `llmforge run` on a CPU machine picks 2 for a small pretraining spec (README; "
                                "`LLMFORGE_AUTO_LAYOUT=0` keeps the default 1).")
    collective_timeout_s: float = Field(
        600.0, gt=0, description="Seconds a collective may wait before the job fails with a clear message (a lost rank must not hang the others)."
    )

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc_per_node

    @property
    def expert_tensor_parallel(self) -> int:
        return self.expert_tensor_parallel_size or self.tensor_model_parallel_size

    def resolved_expert_data_parallel_size(self) -> int:
        """Replicas of each expert: world / (ETP × EP × PP)."""
        experts = self.expert_tensor_parallel * self.expert_model_parallel_size * self.pipeline_model_parallel_size
        return max(1, self.world_size // experts)

    def resolved_data_parallel_size(self) -> int:
        if self.data_parallel_size == "auto":
            return max(1, self.world_size // (self.tensor_model_parallel_size * self.pipeline_model_parallel_size))
        return self.data_parallel_size


class LoggingConfig(StrictModel):
    """Console, metrics file, TensorBoard and callbacks."""

    log_interval: int = Field(10, ge=1, description="Write a train row to metrics.jsonl and TensorBoard every this many steps.")
    tensorboard: bool = Field(True, description="Write TensorBoard event files under <run_dir>/tb.")
    sample_prompt: str | None = Field(None, description="Prompt for the greedy text sample logged at each eval; None = the first tokens of a val sample.")
    sample_tokens: int = Field(48, ge=0, description="Tokens generated for that sample; 0 turns samples off.")
    callbacks: list[CallbackRef] = Field(default_factory=list, description="Registered callbacks called during training, e.g. from a plugin.")


class CheckpointConfig(StrictModel):
    """When checkpoints are written and how many are kept."""

    interval: int | None = Field(None, ge=1, description="Save every this many optimizer steps (and always at the end of a stage). None = only at the end.")
    keep_last: int = Field(2, ge=1, description="Complete checkpoints kept per stage; the newest complete one is never deleted.")
    on_corrupt: Literal["fallback", "stop"] = Field(
        "fallback", description="A checkpoint failing its checksums on resume: `fallback` to the previous complete one, or `stop`."
    )
    preempt_timeout: float = Field(120.0, gt=0, description="Seconds allowed, after SIGTERM, to write a final checkpoint before exiting.")
    async_save: bool | None = Field(
        None,
        description="Write interval checkpoints in the background: the step's state is copied to host memory (one more copy "
        "of it held there), training goes on, and the `COMPLETE` marker comes once the files are on disk; the next save, an "
        "evaluation at that step, the end of the stage and SIGTERM wait for it. The final checkpoint is always written at "
        "once. None: on with a GPU; off on the CPU, where the write shares the cores with training and measured no faster "
        "overall than writing at once (docs/performance.md).",
    )


class Spec(StrictModel):
    """An llmforge spec: data, tokenizer, model, parallelism and an ordered list of stages."""

    schema_version: Literal[1] = Field(SCHEMA_VERSION, description="Version of the spec language; this llmforge reads version 1.")
    name: str = Field(..., min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="Run name; the default run dir is runs/<name>.")
    seed: int = Field(1234, ge=0, description="Seed for initialization, data order and dropout. It is saved in every checkpoint.")
    run_dir: str | None = Field(None, description="Where outputs go; default runs/<name>. `--run-dir` overrides it.")
    tokenizer: TokenizerRef = Field(..., description="The tokenizer component, e.g. `{name: bpe, vocab_size: 8192}`.")
    data: DataConfig = Field(default_factory=dict, description="Pretraining data sources and sharding.")
    model: ModelRef = Field(..., description="The model component and its shape, e.g. `{name: gpt, num_layers: 4, ...}`.")
    parallelism: ParallelismConfig = Field(default_factory=dict, description="Tensor, pipeline and data parallel layout.")
    stages: list[StageRef] = Field(..., min_length=1, description="Ordered stages, each with a unique `name` and a registered `type`.")
    logging: LoggingConfig = Field(default_factory=dict, description="Metrics, TensorBoard and callbacks.")
    checkpoint: CheckpointConfig = Field(default_factory=dict, description="Checkpoint schedule and retention.")

    @model_validator(mode="after")
    def _unique_stage_names(self) -> Spec:
        seen: set[str] = set()
        for i, stage in enumerate(self.stages):
            stage_name = getattr(stage, "name", None)
            if stage_name in seen:
                raise field_error(Spec, ("stages", i, "name"), stage_name, f"stage name {stage_name!r} is used twice; stage names must be unique")
            seen.add(stage_name)
        return self

    def stage(self, name: str):
        return next(s for s in self.stages if s.name == name)

    @property
    def resolved_run_dir(self) -> str:
        return self.run_dir or f"runs/{self.name}"
