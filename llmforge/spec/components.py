"""Options models of the built-in components. The registry adds each one's `name` literal.

They live apart from the code that builds the components so that `validate`, `plan` and
`schema` can import them without torch.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from llmforge.spec.base import StrictModel, field_error

# --- tokenizers -------------------------------------------------------------------------


class SpecialTokens(StrictModel):
    """Special tokens added to the vocabulary."""

    bos: str | None = Field("<|bos|>", description="Beginning-of-sequence token; None for none.")
    eos: str = Field("<|eos|>", description="End-of-document token, appended to every document.")
    pad: str = Field("<|pad|>", description="Padding token (finetune batches).")
    chat_roles: list[str] = Field(
        default_factory=lambda: ["<|system|>", "<|user|>", "<|assistant|>"], description="Role tokens used by chat templates in SFT."
    )
    extra: list[str] = Field(default_factory=list, description="Further special tokens.")


class BPETokenizer(StrictModel):
    """Byte-level BPE trained with HF `tokenizers` on the spec's data sources."""

    vocab_size: int = Field(8192, ge=300, description="Vocabulary size including the 256 byte tokens and the special tokens.")
    min_frequency: int = Field(2, ge=1, description="Minimum pair frequency for a merge.")
    split_digits: bool = Field(False, description="Split numbers into single digits (arithmetic tasks need this).")
    special_tokens: SpecialTokens = Field(default_factory=dict, description="Special tokens.")
    train_max_mb: float = Field(64.0, gt=0, description="Train on at most this many MiB of the sources (the first ones in order).")


class CharTokenizer(StrictModel):
    """One token per character seen in the training text (nanoGPT's shakespeare-char)."""

    add_eos: bool = Field(False, description="Add an end-of-document token (nanoGPT's char recipe has none).")


class ByteTokenizer(StrictModel):
    """The 256 byte values plus special tokens."""

    special_tokens: SpecialTokens = Field(default_factory=dict, description="Special tokens (after the 256 bytes).")


class PretrainedTokenizer(StrictModel):
    """A local tokenizer: a `tokenizer.json`, an HF tokenizer directory or a tiktoken BPE file. Nothing is downloaded."""

    path: str = Field(..., description="Path to tokenizer.json, a directory holding one, or a *.tiktoken file.")


# --- data sources -----------------------------------------------------------------------


class SourceFilters(StrictModel):
    """Per-source document filters, counted in the manifest or a finetune stage's log (records: lengths of their text, dedup whole)."""

    min_chars: int = Field(0, ge=0, description="Drop documents shorter than this many characters.")
    max_chars: int | None = Field(None, ge=1, description="Drop documents longer than this many characters.")
    dedup: bool = Field(False, description="Drop exact duplicate documents (by content hash).")


class FileSource(StrictModel):
    """Fields of every file-based source."""

    paths: list[str] = Field(..., min_length=1, description="Files or globs (`**` recurses); relative paths resolve against the working directory.")
    exclude: list[str] = Field(default_factory=list, description="Glob patterns (on the full path) of files or folders to skip.")
    filters: SourceFilters = Field(default_factory=dict, description="Document filters.")

    @property
    def record_fields(self) -> frozenset[str]:
        """The fields a finetune record of this source may have; empty: it yields plain documents.

        `validate` matches them against what a stage reads. A plugin source may define it too;
        without it, validate cannot tell.
        """
        return frozenset()


class TextSource(FileSource):
    """Plain text files; `.gz` and `.zst` ones are decompressed as they are read."""

    document: Literal["file", "paragraph", "line"] = Field("file", description="What one document is: a whole file, a blank-line paragraph, or a line.")


class JsonlSource(FileSource):
    """JSON Lines (`.jsonl`, `.jsonl.gz`, `.jsonl.zst`): one document per line, from one or more fields."""

    fields: list[str] = Field(default_factory=lambda: ["text"], min_length=1, description="Fields joined to form the document.")
    template: str | None = Field(None, description="Python format string over the fields, e.g. '{title}\\n\\n{body}'; default joins them with newlines.")


class WebDatasetSource(StrictModel):
    """WebDataset tar shards, read through the webdataset library: text samples, or llmforge's own token shards."""

    paths: list[str] = Field(..., min_length=1, description="Shards: local files or globs, brace patterns (`shard-{000000..000099}.tar`), "
                             "`pipe:` commands (`pipe:aws s3 cp s3://bucket/shard-000001.tar -`) or http(s) URLs (opened with curl).")
    member: str = Field("txt", min_length=1, description="Extension of the member holding a sample's text (`txt`, `md`...), or `json` "
                        "to read `field` of its .json member. Samples holding `tokens.npy` are read as tokens.")
    field: str | None = Field(None, description="With member `json` (or `*.json`): the field holding the text; default `text`.")
    filters: SourceFilters = Field(default_factory=dict, description="Document filters (text samples).")

    # The URL schemes webdataset's gopen opens (its `gopen_schemes`); `s3://` is not one: a `pipe:` command reads it.
    URL_SCHEMES: ClassVar[frozenset[str]] = frozenset({"file", "http", "https", "sftp", "ftps", "scp", "gs", "ais", "hf", "htgs"})

    @model_validator(mode="after")
    def _field_needs_json(self) -> WebDatasetSource:
        self.member = self.member.lstrip(".").lower()  # webdataset groups members by lower-case extension, without its dot
        for j, path in enumerate(self.paths):
            scheme = path.split("://", 1)[0].lower() if "://" in path and not path.startswith("pipe:") else None
            if scheme is not None and scheme not in self.URL_SCHEMES:
                raise field_error(type(self), ("paths", j), path, f"webdataset cannot open {scheme}:// URLs (it opens "
                                  f"{', '.join(sorted(self.URL_SCHEMES))} and pipe: commands); e.g. for S3 write "
                                  f"'pipe:aws s3 cp {path} -'")
        if self.member.endswith("json"):
            if self.field is None:
                self.field = "text"
        elif self.field is not None:
            raise field_error(type(self), "field", self.field, f"field applies to a .json member, but member is {self.member!r}")
        return self

    @property
    def record_fields(self) -> frozenset[str]:
        return frozenset()  # text or token documents


class ParquetSource(FileSource):
    """Parquet files (pyarrow; `llmforge[parquet]`), read one row group at a time."""

    fields: list[str] = Field(default_factory=lambda: ["text"], min_length=1, description="Columns joined by newlines to form the document.")
    template: str | None = Field(None, description="Python format string over the columns, e.g. '{title}\\n\\n{body}'; default joins them with newlines.")


class HFDatasetSource(StrictModel):
    """A local Hugging Face dataset (`datasets`; `llmforge[hf]`), streamed offline: nothing is fetched or copied into a cache."""

    path: str = Field(..., description="A folder written by `save_to_disk`, or a folder of Parquet or JSONL files.")
    split: str = Field("train", description="The split to read.")
    format: Literal["text", "prompt_response", "messages", "preferences"] = Field(
        "text", description="`text`: documents from `fields`; the others: finetune records, as the instructions (prompt_response, "
        "messages) and preferences sources read them.")
    fields: list[str] = Field(default_factory=lambda: ["text"], min_length=1, description="With format text: columns joined by newlines.")
    template: str | None = Field(None, description="With format text: Python format string over the columns.")
    filters: SourceFilters = Field(default_factory=dict, description="Document filters.")

    @model_validator(mode="after")
    def _text_options_need_text(self) -> HFDatasetSource:
        for name in ("fields", "template"):
            if self.format != "text" and name in self.model_fields_set:
                raise field_error(type(self), name, getattr(self, name), f"{name} applies to format text, but format is {self.format!r}")
        return self

    @property
    def record_fields(self) -> frozenset[str]:
        return {"text": frozenset(), "messages": frozenset({"messages"}), "prompt_response": frozenset({"prompt", "response", "system"}),
                "preferences": frozenset({"prompt", "chosen", "rejected"})}[self.format]


class InstructionSource(FileSource):
    """Instruction records, by file extension: JSONL (`.jsonl`, `.jsonl.gz`, `.jsonl.zst`) or Parquet: `prompt`/`response`, or chat `messages`."""

    format: Literal["prompt_response", "messages"] = Field("prompt_response", description="Record layout.")

    @property
    def record_fields(self) -> frozenset[str]:
        return frozenset({"messages"} if self.format == "messages" else {"prompt", "response", "system"})


class PreferenceSource(FileSource):
    """Preference records, by file extension: JSONL (`.jsonl`, `.jsonl.gz`, `.jsonl.zst`) or Parquet: `prompt`, `chosen`, `rejected`."""

    @property
    def record_fields(self) -> frozenset[str]:
        return frozenset({"prompt", "chosen", "rejected"})


# --- model ------------------------------------------------------------------------------


class GPTModel(StrictModel):
    """A megatron-core GPTModel. Keys are Megatron-LM's."""

    num_layers: int = Field(..., ge=1, description="Transformer layers.")
    hidden_size: int = Field(..., ge=1, description="Model width.")
    num_attention_heads: int = Field(..., ge=1, description="Attention heads.")
    num_query_groups: int | None = Field(None, ge=1, description="Key/value heads for grouped-query attention; None = num_attention_heads.")
    ffn_hidden_size: int | None = Field(None, ge=1, description="MLP width; None = 4 × hidden_size.")
    vocab_size: int = Field(..., ge=1, description="Embedding rows; must be ≥ the tokenizer's vocabulary.")
    seq_length: int = Field(..., ge=1, description="Training sequence length in tokens.")
    max_position_embeddings: int | None = Field(None, ge=1, description="Longest supported sequence; None = seq_length.")
    kv_channels: int | None = Field(
        None, ge=1, description="Width of each attention head (HF's head_dim); None = hidden_size / num_attention_heads. "
        "It may differ from that (Qwen3-0.6B: hidden 1024, 16 heads of 128): attention then works on "
        "num_attention_heads × kv_channels features, projected from and back to hidden_size.")
    position_embedding_type: Literal["learned_absolute", "rope"] = Field("learned_absolute", description="Position encoding.")
    rotary_base: float = Field(10000, ge=1, description="RoPE base (theta); need not be a whole number.")
    rope_scaling_factor: float | None = Field(
        None, ge=1, description="Llama 3.x RoPE scaling (HF `rope_type: llama3`; megatron's `rope_scaling` with "
        "`rope_scaling_factor`): rotary wavelengths longer than the original context grow by this factor, those under a "
        "quarter of it stay, the band between is blended. megatron-core 0.16 fixes the other llama3 settings at Llama 3.1 "
        "and 3.2's values: low_freq_factor 1, high_freq_factor 4, original_max_position_embeddings 8192. null = no scaling.")
    normalization: Literal["LayerNorm", "RMSNorm"] = Field("LayerNorm", description="Norm layer type.")
    norm_epsilon: float = Field(1e-5, gt=0, description="Norm epsilon.")
    activation: Literal["gelu", "gelu_tanh", "swiglu"] = Field("gelu", description="MLP activation; `swiglu` makes the MLP gated.")
    add_bias_linear: bool = Field(True, description="Biases in linear layers.")
    add_qkv_bias: bool = Field(False, description="A bias on the fused query/key/value projection only (Qwen2, Qwen2.5), "
                               "with add_bias_linear false (which already gives every linear one).")
    qk_layernorm: bool = Field(False, description="Normalize each head's query and key (over kv_channels, with the "
                               "`normalization` type and norm_epsilon, one weight shared by all heads) before RoPE, as Qwen3 does.")
    untie_embeddings_and_output_weights: bool = Field(False, description="Separate output projection instead of the tied input embedding.")
    hidden_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout after attention and MLP.")
    attention_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on attention probabilities.")
    init_method_std: float = Field(0.02, gt=0, description="Std of the normal weight init.")
    # Mixture of experts: megatron-core's MoE layer, router and token dispatchers (llmforge.models.moe).
    num_moe_experts: int | None = Field(None, ge=2, description="Experts per MoE layer; null = a dense model.")
    moe_router_topk: int = Field(2, ge=1, description="Experts each token is routed to.")
    moe_ffn_hidden_size: int | None = Field(None, ge=1, description="Each expert's MLP width; null = ffn_hidden_size.")
    moe_shared_expert_intermediate_size: int | None = Field(
        None, ge=1, description="Width of the shared expert every token also goes through (all shared experts together, "
        "Qwen2-MoE / DeepSeek); null = none.")
    moe_shared_expert_gate: bool = Field(
        False, description="Scale the shared expert's output by a learned sigmoid gate of the token (one [1, hidden] weight "
        "per layer; Qwen2-MoE's `shared_expert_gate`). Needs moe_shared_expert_intermediate_size.")
    moe_router_load_balancing_type: Literal["aux_loss", "seq_aux_loss", "none"] = Field(
        "aux_loss", description="Load-balancing loss: `aux_loss` (Switch/GShard, per micro batch), `seq_aux_loss` (per "
        "sequence, DeepSeek-V3), or `none`.")
    moe_aux_loss_coeff: float = Field(1e-2, ge=0, description="Weight of the load-balancing loss (Mixtral 0.02, Qwen3-MoE 0.001).")
    moe_z_loss_coeff: float | None = Field(None, ge=0, description="Weight of the router z-loss (ST-MoE; 1e-3 is a start); null = none.")
    moe_router_pre_softmax: bool = Field(
        False, description="Softmax over all experts before the top-k (HF `norm_topk_prob: false`, Qwen2-MoE): the chosen "
        "probabilities are kept unrenormalised. false = softmax over the chosen k (renormalised; Mixtral, Qwen3-MoE). "
        "Top-1 routing needs true.")
    moe_token_dispatcher_type: Literal["alltoall", "allgather"] = Field(
        "alltoall", description="How tokens reach experts on other expert-parallel ranks: `alltoall` sends each token "
        "only where it is routed; `allgather` gathers every token on every rank.")
    moe_expert_capacity_factor: float | None = Field(
        None, gt=0, description="Tokens an expert takes, as a multiple of an even share; the rest are dropped. null = dropless.")
    moe_layer_freq: int = Field(1, ge=1, description="Every this many layers is an MoE layer (layer i when i % freq == 0); 1 = all.")

    @property
    def kv_groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def ffn(self) -> int:
        return self.ffn_hidden_size or 4 * self.hidden_size

    @property
    def max_positions(self) -> int:
        return self.max_position_embeddings or self.seq_length

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @model_validator(mode="after")
    def _shape(self) -> GPTModel:
        # With kv_channels given, megatron projects to heads × kv_channels: the width need not divide.
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads:
            raise field_error(
                GPTModel,
                "num_attention_heads",
                self.num_attention_heads,
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}; "
                "pick heads that divide the width (e.g. hidden 512 with 8 heads), or set kv_channels",
            )
        if self.num_attention_heads % self.kv_groups:
            raise field_error(
                GPTModel,
                "num_query_groups",
                self.num_query_groups,
                f"num_attention_heads {self.num_attention_heads} is not divisible by num_query_groups {self.kv_groups}",
            )
        rope = self.position_embedding_type == "rope"
        # RoPE turns pairs of a head's channels; an odd head width fails inside megatron's rotary embedding.
        if rope and self.head_dim % 2 and self.kv_channels:
            raise field_error(GPTModel, "kv_channels", self.kv_channels,
                              f"kv_channels {self.kv_channels} is odd; RoPE turns pairs of a head's channels, so it needs an even one")
        if rope and self.head_dim % 2:
            raise field_error(GPTModel, "num_attention_heads", self.num_attention_heads,
                              f"heads are hidden_size {self.hidden_size} / {self.num_attention_heads} = {self.head_dim} wide, an odd "
                              "width; RoPE turns pairs of a head's channels, so pick heads that leave an even width, or set kv_channels")
        if self.rope_scaling_factor is not None and not rope:
            raise field_error(GPTModel, "rope_scaling_factor", self.rope_scaling_factor,
                              f"RoPE scaling needs position_embedding_type rope, not {self.position_embedding_type}; "
                              "drop rope_scaling_factor (null)")
        if self.add_qkv_bias and self.add_bias_linear:
            raise field_error(GPTModel, "add_qkv_bias", self.add_qkv_bias,
                              "add_bias_linear already puts a bias on the QKV projection; drop add_qkv_bias, "
                              "or set add_bias_linear false for a bias on QKV only")
        self._moe_shape()
        return self

    def _moe_shape(self) -> None:
        """What megatron's MoE layer and router refuse, said at the key to change."""
        if self.num_moe_experts is None:
            for key, default in (("moe_ffn_hidden_size", None), ("moe_shared_expert_intermediate_size", None), ("moe_layer_freq", 1),
                                 ("moe_shared_expert_gate", False)):
                if getattr(self, key) != default:
                    raise field_error(GPTModel, key, getattr(self, key),
                                      f"{key} describes MoE layers, but num_moe_experts is null (a dense model); set num_moe_experts or drop {key}")
            return
        if self.moe_router_topk > self.num_moe_experts:
            raise field_error(GPTModel, "moe_router_topk", self.moe_router_topk,
                              f"moe_router_topk {self.moe_router_topk} routes each token to more experts than num_moe_experts "
                              f"{self.num_moe_experts}; use at most {self.num_moe_experts}")
        if self.moe_router_topk == 1 and not self.moe_router_pre_softmax:
            raise field_error(GPTModel, "moe_router_topk", self.moe_router_topk,
                              "top-1 routing with moe_router_pre_softmax false takes a softmax over one expert, whose gradient is zero "
                              "(megatron refuses it); set moe_router_pre_softmax: true, or moe_router_topk ≥ 2")
        if self.moe_shared_expert_gate and self.moe_shared_expert_intermediate_size is None:
            raise field_error(GPTModel, "moe_shared_expert_gate", self.moe_shared_expert_gate,
                              "moe_shared_expert_gate scales the shared expert, but moe_shared_expert_intermediate_size is null "
                              "(no shared expert); set its width or drop moe_shared_expert_gate")
        if self.add_bias_linear:
            raise field_error(GPTModel, "add_bias_linear", self.add_bias_linear,
                              "MoE experts and shared experts take no biases here (megatron supports expert biases only partly); "
                              "set add_bias_linear: false (Mixtral, Qwen-MoE and DeepSeek have none)")

    @property
    def moe_ffn(self) -> int:
        return self.moe_ffn_hidden_size or self.ffn

    def is_moe_layer(self, layer: int) -> bool:
        """Whether global layer `layer` (from 0) has experts (megatron's `moe_layer_freq` as an int)."""
        return self.num_moe_experts is not None and layer % self.moe_layer_freq == 0


# --- optimizers and schedules -----------------------------------------------------------


class AdamW(StrictModel):
    """torch AdamW (fused/foreach where available). Norms and biases get no weight decay."""

    lr: float = Field(3.0e-4, gt=0, description="Peak learning rate.")
    betas: tuple[float, float] = Field((0.9, 0.95), description="Adam betas.")
    eps: float = Field(1e-8, gt=0, description="Adam epsilon.")
    weight_decay: float = Field(0.1, ge=0, description="Decoupled weight decay for matrices.")
    decay_embeddings: bool = Field(True, description="Apply weight decay to the embedding too (LitGPT and nanoGPT do; some recipes do not).")


class SGD(StrictModel):
    """Plain SGD with optional momentum (parity tests use it: Adam amplifies rounding)."""

    lr: float = Field(0.1, gt=0, description="Learning rate.")
    momentum: float = Field(0.0, ge=0, description="Momentum.")
    weight_decay: float = Field(0.0, ge=0, description="Weight decay for matrices.")


class ScheduleBase(StrictModel):
    warmup_steps: int = Field(0, ge=0, description="Linear warmup: step s (from 0) of these trains at lr × (s + 1) / warmup_steps.")


class ConstantSchedule(ScheduleBase):
    """Warmup, then constant."""


class CosineSchedule(ScheduleBase):
    """Warmup, then cosine decay to min_lr at the end of the stage (or at decay_steps)."""

    min_lr: float = Field(0.0, ge=0, description="Final learning rate.")
    decay_steps: int | None = Field(None, ge=1, description="Steps from start to the end of decay; None = the stage's total steps.")


class LinearSchedule(CosineSchedule):
    """Warmup, then linear decay to min_lr."""


class WSDSchedule(ScheduleBase):
    """Warmup-stable-decay: constant after warmup, then decay over the last `decay_fraction` of steps."""

    min_lr: float = Field(0.0, ge=0, description="Final learning rate.")
    decay_fraction: float = Field(0.2, gt=0, le=1, description="Fraction of the stage spent decaying.")
    decay_style: Literal["linear", "cosine", "sqrt"] = Field("linear", description="Shape of the decay.")


# --- evaluators -------------------------------------------------------------------------


class ValLoss(StrictModel):
    """Validation loss and perplexity over the first `eval_iters` × global_batch_size samples of the val split."""


class TaskSet(StrictModel):
    """A deterministic synthetic task set (llmforge.data.tasks): addition and string reversal."""

    tasks: list[Literal["add2", "add3", "reverse"]] = Field(default_factory=lambda: ["add2"], min_length=1, description="Task kinds, cycled in order.")
    num_examples: int = Field(200, ge=1, description="How many examples.")
    seed: int = Field(0, ge=0, description="Generator seed: the same seed gives the same examples.")
    split: Literal["heldout", "train", "all"] = Field(
        "heldout", description="Which side of the fixed problem partition to draw from: `heldout` (one problem in ten, "
        "chosen by a hash of the problem, never in a `train` set), `train` (the other nine), or `all`.")


class ExactMatch(StrictModel):
    """Exact-match accuracy of greedy generations on a task set (synthetic, or instruction JSONL)."""

    tasks: TaskSet | None = Field(None, description="A synthetic held-out task set.")
    paths: list[str] = Field(default_factory=list, description="Instruction JSONL files with prompt/response (alternative to `tasks`).")
    max_examples: int = Field(100, ge=1, description="Score at most this many examples.")
    max_new_tokens: int = Field(8, ge=1, description="Tokens generated per answer (generation stops at EOS).")

    @model_validator(mode="after")
    def _one_source(self) -> ExactMatch:
        if (self.tasks is None) == (not self.paths):
            raise ValueError("give exactly one of `tasks` or `paths`")
        return self


class MultipleChoice(StrictModel):
    """Accuracy of picking the highest log-likelihood choice, from JSONL {prompt, choices, answer (index)}."""

    paths: list[str] = Field(..., min_length=1, description="JSONL files of multiple-choice items.")
    max_examples: int = Field(200, ge=1, description="Score at most this many items.")
    normalize: bool = Field(True, description="Compare mean log-likelihood per token (else the sum), as lm-eval's acc_norm does per length.")


class SamplePreview(StrictModel):
    """Greedy samples from fixed prompts, written to TensorBoard text and the log."""

    prompts: list[str] = Field(..., min_length=1, description="Prompts to continue.")
    max_new_tokens: int = Field(32, ge=1, description="Tokens generated per prompt.")


LM_EVAL_EXTRA = 'pip install -e ".[eval]" (lm-eval >= 0.4.13, < 0.5)'


class LMEval(StrictModel):
    """Tasks of EleutherAI's lm-evaluation-harness, run on the stage's model at its layout (docs/evaluation.md).

    Each task's metrics go to the eval row as `<task>/<metric>` (`<task>/<metric>/<filter>` for
    filters other than `none`); groups' aggregates too. Not in a prompt_tuning stage (its soft prompt
    is not applied here: evaluate its checkpoints with `llmforge eval`).
    """

    tasks: list[str] = Field(..., min_length=1, description="Harness task, group or tag names (or task YAML paths), as `lm_eval --tasks` takes them.")
    include_path: list[str] = Field(
        default_factory=list, description="Folders of task YAMLs; given, tasks are looked up only there (local data, no "
        "network, and the harness's 10-second index of its own tasks is skipped); empty, the harness's own tasks. "
        "Relative `data_files` in a task YAML resolve against the YAML's folder.")
    num_fewshot: int | None = Field(None, ge=0, description="Few-shot examples per prompt; null = each task's own default.")
    limit: float | None = Field(None, gt=0, description="At most this many documents per task (a fraction of each task when below 1).")
    batch_size: int | None = Field(None, ge=1, description="Requests per forward; null = the stage's micro_batch_size.")
    apply_chat_template: bool = Field(False, description="Render prompts with the tokenizer's own chat template "
                                                          "(few-shot examples as turns), as `lm_eval --apply_chat_template`.")
    system_instruction: str | None = Field(None, description="A system message before every prompt (with apply_chat_template: a system turn).")


class TaskSource(TaskSet):
    """Synthetic task data as a data source: instruction records, preference pairs, or plain text lines."""

    format: Literal["instructions", "preferences", "text"] = Field("instructions", description="What each example becomes.")
    split: Literal["heldout", "train", "all"] = Field(
        "train", description="Which side of the fixed problem partition to draw from: `train` (nine problems in ten; "
        "evaluator task sets default to the other side, `heldout`), `heldout`, or `all`.")

    @property
    def record_fields(self) -> frozenset[str]:
        return {"instructions": frozenset({"prompt", "response"}), "preferences": frozenset({"prompt", "chosen", "rejected"}),
                "text": frozenset()}[self.format]


# --- finetune evaluators ----------------------------------------------------------------


class HeldOutPairs(StrictModel):
    """Held-out preference pairs: a synthetic task set, or preference JSONL."""

    tasks: TaskSet | None = Field(None, description="A synthetic held-out task set (its right and a wrong answer form each pair).")
    paths: list[str] = Field(default_factory=list, description="Preference JSONL files with prompt/chosen/rejected (alternative to `tasks`).")
    max_examples: int = Field(100, ge=1, description="Score at most this many pairs.")

    @model_validator(mode="after")
    def _one_source(self) -> HeldOutPairs:
        if (self.tasks is None) == (not self.paths):
            raise ValueError("give exactly one of `tasks` or `paths`")
        return self


class Preference(HeldOutPairs):
    """How much the model prefers chosen over rejected responses: the log-likelihood margin and win rate.

    With a reference model (dpo, rl) it also reports the reference's margin and win rate (the
    starting checkpoint) and DPO's implicit-reward margin and accuracy.
    """

    # What the evaluator asks of its stage's EvalContext beyond generation and scoring; validate
    # refuses it in a stage that does not offer that (StageBase.offers), rather than reporting nothing.
    needs: ClassVar[frozenset[str]] = frozenset({"logprobs"})


class PairwiseAccuracy(HeldOutPairs):
    """How often a reward model (reward_model stage) scores chosen above rejected, and the mean score margin."""

    needs: ClassVar[frozenset[str]] = frozenset({"reward_scores"})


class MeanReward(ExactMatch):
    """Mean reward of greedy completions of held-out prompts, scored by the RL stage's reward components."""

    needs: ClassVar[frozenset[str]] = frozenset({"rewards"})


# --- rewards ----------------------------------------------------------------------------


class RewardBase(StrictModel):
    """Fields of every reward component."""

    weight: float = Field(1.0, description="This component's weight; an RL stage sums its components' weighted rewards.")


class ExactMatchReward(RewardBase):
    """Rule-based: 1 when the completion, stripped, equals the record's reference answer, else 0."""

    field: str = Field("response", description="Record field holding the reference answer.")


class DigitMatchReward(ExactMatchReward):
    """Rule-based partial credit: the fraction of the reference answer's characters right in place (1 when exact)."""


class RewardModelReward(RewardBase):
    """The scalar score of a model trained by a `reward_model` stage, on prompt + completion."""

    stage: str = Field(..., description="The reward_model stage (by name) or a path to its checkpoint.")
