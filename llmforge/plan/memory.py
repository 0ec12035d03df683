"""Memory per rank: weights, gradients, optimizer states and activations (no torch).

Weights and optimizer follow what `llmforge.runtime` does. Gradients are fp32 in every
precision (megatron's DDP buffer: 4 bytes). `precision: bf16` is megatron's mixed
precision, Megatron-LM's `--bf16`: 2-byte weights, and the optimizer keeps fp32 master
weights besides its fp32 states (AdamW: 4 + 8 = 12 bytes). `fp32` and `bf16-autocast`
keep 4-byte weights, which the optimizer steps directly (AdamW: 8 bytes). The
distributed optimizer shards the optimizer's bytes, master weights included, over
data-parallel ranks (ZeRO-1): Megatron's 2 + 4 + 12/DP; weights and the gradient buffer
stay whole.

Activations start from Korthikanti et al. 2022, "Reducing Activation Recomputation in
Large Transformer Models", and are adapted, term by term, to what megatron-core's local
layer spec with SDPA attention saves for backward in bf16 (megatron's, or torch autocast
over fp32 parameters) and fp32. The terms were checked against the tensors autograd saves
(tests/unit/plan/test_reality.py):

- attention saves q, k, v, its output and a log-sum-exp: no s×s scores (SDPA/flash).
  Only attention dropout on CPU falls back to the math kernel, which stores the scores;
- the per-head q/k norms (`qk_layernorm`) keep what the layer norms keep, per head; a QKV
  bias (`add_qkv_bias`) makes the QKV output fp32, as every bias does;
- dropout at 0 stores no masks; above 0 each stores a mask as large as its input;
- megatron casts the residual stream to the branch's dtype, so under bf16 autocast it is
  bf16 unless a bias (an fp32 parameter) promotes it back to fp32; under megatron's bf16
  everything (biases, embeddings, what pipeline stages pass) is bf16;
- torch's RMSNorm keeps its input in fp32 (a copy of a bf16 one) and the reciprocal RMS;
  on the CPU, whose rms_norm is composed of smaller ops, also the normalized input.
  LayerNorm keeps its input and two statistics;
- on CUDA, fp32 attention runs SDPA's memory-efficient kernel, whose output the output
  projection copies (flash attention's output keeps q's layout, so in bf16 it is a view);
- the loss keeps fp32 softmax over the (vocab-parallel) logits: the largest single
  term with a big vocabulary, held for one micro batch on the last pipeline stage.

The CUDA terms (the RMSNorm's and the attention output's) were measured on an H200 with
`benchmarks/memory_probe.py` (docs/performance.md, the GPU check of 2026-12-04): one
layer's saved bytes matched the plan exactly for GPT-2-, Llama- and Qwen3-shaped layers in
megatron's bf16 and for the 1B spec in fp32; the whole step's peak within 1%.

Tensor parallelism divides everything inside attention and the MLP; sequence parallelism
also divides the norms and the inputs the column-parallel layers keep. Full recompute
keeps each layer's input and rematerializes one layer at a time during backward;
selective recompute (megatron's default `core_attn`) drops what attention keeps beyond
its inputs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from llmforge.models import size

FP32 = 4
BF16 = 2
GRAD_BYTES = FP32  # fp32 main grads in every precision (megatron DDP's grad_reduce_in_fp32)


FP8 = 1
MEGATRON_BF16 = ("bf16", "fp8")  # bf16 parameters and fp32 masters; fp8 adds TE's FP8 copies and activations
# TE keeps each FP8 GEMM weight quantized between its forward and backward: the rowwise copy and,
# on Hopper, the transposed (columnwise) one the backward's data-gradient GEMM reads.
FP8_WEIGHT_COPIES = 2


def weight_bytes(precision: str) -> int:
    """Bytes of one parameter: bf16 under megatron's bf16 (and fp8 on top of it), else fp32 (autocast casts per use)."""
    return BF16 if precision in MEGATRON_BF16 else FP32


def master_weight_bytes(precision: str) -> int:
    """The optimizer's fp32 copy of a bf16 parameter (megatron's main params): optimizer state."""
    return FP32 if precision in MEGATRON_BF16 else 0


@dataclass(frozen=True)
class Layout:
    """The knobs memory depends on: the parallel layout and the micro batch."""

    tensor: int
    pipeline: int
    virtual: int
    data: int
    sequence_parallel: bool
    recompute: str
    distributed_optimizer: bool
    micro_batch_size: int
    global_batch_size: int
    nnodes: int
    nproc_per_node: int
    expert: int = 1  # expert-parallel ranks (EP)
    expert_tensor: int | None = None  # expert-tensor-parallel ranks (ETP); None = tensor

    @classmethod
    def from_spec(cls, parallelism: Any, train: Any = None) -> Layout:
        """The spec's layout with a training stage's batch settings (one sequence without one)."""
        return cls(
            tensor=parallelism.tensor_model_parallel_size,
            pipeline=parallelism.pipeline_model_parallel_size,
            virtual=parallelism.virtual_pipeline_model_parallel_size or 1,
            data=parallelism.resolved_data_parallel_size(),
            sequence_parallel=parallelism.sequence_parallel,
            recompute=parallelism.recompute_granularity,
            distributed_optimizer=parallelism.use_distributed_optimizer,
            micro_batch_size=train.micro_batch_size if train else 1,
            global_batch_size=train.global_batch_size if train else 1,
            nnodes=parallelism.nnodes,
            nproc_per_node=parallelism.nproc_per_node,
            expert=getattr(parallelism, "expert_model_parallel_size", 1),
            expert_tensor=getattr(parallelism, "expert_tensor_parallel_size", None),
        )

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc_per_node

    @property
    def num_microbatches(self) -> int:
        return max(1, self.global_batch_size // (self.micro_batch_size * self.data))

    def with_(self, **changes: Any) -> Layout:
        return replace(self, **changes)

    # `size` reads the parallelism through these names, so a Layout can stand in for it.
    @property
    def tensor_model_parallel_size(self) -> int:
        return self.tensor

    @property
    def pipeline_model_parallel_size(self) -> int:
        return self.pipeline

    @property
    def expert_model_parallel_size(self) -> int:
        return self.expert

    @property
    def expert_tensor_parallel_size(self) -> int:
        return self.expert_tensor or self.tensor

    @property
    def expert_data(self) -> int:
        """Replicas of each expert: world / (ETP × EP × PP)."""
        return max(1, self.world_size // (self.expert_tensor_parallel_size * self.expert * self.pipeline))


@dataclass
class RankMemory:
    """Bytes one rank of a pipeline stage holds at its peak, by what holds them."""

    pipeline_stage: int
    layers: int
    params: int
    in_flight_microbatches: int
    weights: int
    gradients: int
    optimizer_states: int
    activations: int
    logits: int
    loss_workspace: int
    recompute_buffer: int
    frozen_models: int = 0  # finetune stages: a frozen reference or reward model (plan/finetune.py)
    kv_cache: int = 0  # RL: the rollouts' KV cache
    fp8_weights: int = 0  # precision fp8: TE's FP8 copies of the layers' GEMM weights

    @property
    def total(self) -> int:
        return (self.weights + self.gradients + self.optimizer_states + self.activations + self.logits
                + self.loss_workspace + self.recompute_buffer + self.frozen_models + self.kv_cache + self.fp8_weights)

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total}


# --- optimizer states ---------------------------------------------------------------


def optimizer_state_bytes_per_param(optimizer: Any, *, precision: str) -> tuple[int, str]:
    """(bytes the optimizer keeps per parameter, what that assumes): its fp32 states, plus
    fp32 master weights of bf16 parameters."""
    name = getattr(optimizer, "name", "adamw")
    if name == "adamw":
        state, note = 2 * FP32, "AdamW: exp_avg + exp_avg_sq in fp32"
    elif name == "sgd" and getattr(optimizer, "momentum", 0.0) > 0:
        state, note = FP32, "SGD with momentum: one fp32 buffer"
    elif name == "sgd":
        state, note = 0, "SGD without momentum: no state"
    else:
        state, note = 2 * FP32, f"{name}: unknown to the planner, assumed to keep two fp32 states like AdamW"
    if master_weight_bytes(precision):
        return state + master_weight_bytes(precision), f"{note}, plus fp32 master weights of the bf16 parameters"
    return state, note


def _adam_step_bytes(optimizer: Any, tensors: int) -> int:
    # torch's Adam keeps a float32 `step` scalar tensor per parameter tensor.
    return tensors * FP32 if getattr(optimizer, "name", "adamw") == "adamw" else 0


# --- activations --------------------------------------------------------------------


def _compute_bytes(precision: str) -> int:
    return FP32 if precision == "fp32" else BF16


def stage_input_bytes(precision: str) -> int:
    """Bytes per element of what a chunk's first layer receives: the embedding's output or the
    previous stage's hidden states (fp32 under autocast, whose parameters and transfers are fp32)."""
    return BF16 if precision in MEGATRON_BF16 else FP32


def _bias_promotes(precision: str) -> bool:
    """Under autocast a bias is an fp32 parameter: adding it promotes a bf16 output to fp32."""
    return precision == "bf16-autocast"


def residual_bytes(model: Any, precision: str) -> int:
    """Bytes per element of the residual stream between layers (see the module doc)."""
    if precision == "fp32" or (_bias_promotes(precision) and model.add_bias_linear):
        return FP32
    return _compute_bytes(precision)


def _rms_normalized_kept(device: str) -> bool:
    """Whether RMSNorm keeps its normalized input for backward: the CPU's composite rms_norm
    does; CUDA's fused kernel keeps only its input and the reciprocal RMS (measured, H200)."""
    return device != "cuda"


def _norm_saved(model: Any, tokens: float, in_bytes: int, device: str = "cuda") -> float:
    """Bytes a norm keeps for backward, for `tokens` rows of width hidden."""
    h = model.hidden_size
    if model.normalization == "RMSNorm":
        # fp32 input (a copy of a bf16 one), the normalized input on CPU, rstd
        return tokens * h * FP32 * (1 + _rms_normalized_kept(device)) + tokens * FP32
    return tokens * h * in_bytes + 2 * tokens * FP32  # input, mean, rstd


def qkv_output_bytes(model: Any, precision: str) -> int:
    """Bytes per element of the QKV projection's output: a bias (an fp32 parameter) promotes it."""
    if precision == "fp32" or (_bias_promotes(precision) and (model.add_bias_linear or getattr(model, "add_qkv_bias", False))):
        return FP32
    return _compute_bytes(precision)


def _qk_width(model: Any) -> int:
    """Features of the query and key heads together (what RoPE and the q/k norms touch)."""
    return size.query_width(model) + model.kv_groups * size.head_dim(model)


def _core_attention_inputs(model: Any, tokens: float, tensor: int, dtype: int) -> float:
    """q, k, v as they reach core attention: rotated (or normalized) q and k are new tensors,
    and v (or all three, without either) is a view that keeps the whole QKV output alive."""
    stored = tokens * size.qkv_width(model) / tensor * dtype
    if model.position_embedding_type == "rope" or getattr(model, "qk_layernorm", False):
        stored += tokens * _qk_width(model) / tensor * dtype
    return stored


def _qk_norm_saved(model: Any, tokens: float, tensor: int, precision: str, *, holds_qkv: bool, device: str = "cuda") -> float:
    """What the query and key norms keep, as the layer norms do but per head.

    A bf16 input is copied to fp32; an fp32 one is kept as a view of the QKV output, which
    `holds_qkv` says to count here (attention keeps only bf16 copies of a bias-promoted
    output under autocast). RMSNorm on the CPU also keeps the normalized input.
    """
    width = _qk_width(model) / tensor
    rows = tokens * (model.num_attention_heads + model.kv_groups) / tensor
    if qkv_output_bytes(model, precision) != FP32:
        kept = width * FP32  # the fp32 copy
    elif holds_qkv:
        kept = size.qkv_width(model) / tensor * FP32  # the view keeps the whole QKV output alive
    else:
        kept = 0.0
    if model.normalization == "RMSNorm":
        return tokens * (kept + width * FP32 * _rms_normalized_kept(device)) + rows * FP32  # input, normalized input, rstd
    return tokens * kept + 2 * rows * FP32  # input, mean and rstd


def _attention_terms(model: Any, *, tokens: float, tensor: int, micro_batch_size: int, seq_length: int, compute: int,
                     qkv_out: int, precision: str, device: str) -> dict[str, float]:
    t, heads = tensor, model.num_attention_heads
    per_head_rows = micro_batch_size * heads / t * seq_length
    if device == "cpu" and model.attention_dropout > 0:
        # CPU SDPA has no dropout kernel: the math path keeps the fp32 softmax, dropout
        # mask and dropped scores, and fp32 copies of a scaled q and of k. v is a copy
        # too under bf16 (an fp32 one) or when grouped-query attention expands it, else a
        # view that keeps the whole QKV projection output.
        q_elems = tokens * size.query_width(model) / t
        if precision != "fp32" or model.kv_groups < heads:
            qkv = 3 * q_elems * FP32
        else:
            qkv = 2 * q_elems * FP32 + tokens * size.qkv_width(model) / t * FP32
        return {"attention_qkv": qkv, "attention_scores": 3 * per_head_rows * seq_length * FP32}
    if qkv_out != compute:
        qkv = tokens * size.qkv_width(model) / t * compute  # autocast's bf16 copies of fp32 q, k, v
    else:
        qkv = _core_attention_inputs(model, tokens, t, compute)
    return {"attention_qkv": qkv, "attention_logsumexp": per_head_rows * FP32}


def _mlp_activations(model: Any, elements: float, linear_out: int) -> float:
    """What an MLP keeps over `elements` (tokens × its width on this rank)."""
    if model.activation == "swiglu":
        # gate|up output, silu(gate), up + glu_linear_offset (megatron's copy), their product
        return elements * 5 * linear_out
    return elements * 2 * linear_out  # gelu input, gelu output


def _moe_terms(model: Any, *, tokens: float, split_tokens: float, tensor: int, expert_tensor: int, compute: int,
               linear_out: int) -> dict[str, float]:
    """What megatron's MoE layer keeps: the router's per-expert scores, each routed token's copy
    at its expert and the expert MLPs' activations, one more product for the routing
    probabilities; the shared expert as a dense MLP. A rank routes its sequence-parallel share
    of the tokens; the dispatcher gathers them over expert TP, so an expert rank receives, on
    average, top-k × its expert-TP group's tokens (balanced routing)."""
    experts, k = model.num_moe_experts, model.moe_router_topk
    routed = split_tokens * (expert_tensor if split_tokens < tokens else 1) * k
    terms = {
        "moe_router": split_tokens * experts * 4 * FP32,  # logits, probabilities, aux-loss scores, routing map
        "moe_expert_inputs": routed * model.hidden_size * compute,
        "moe_expert_activations": _mlp_activations(model, routed * model.moe_ffn / expert_tensor, linear_out)
        + routed * model.moe_ffn / expert_tensor * linear_out,
    }
    shared = getattr(model, "moe_shared_expert_intermediate_size", None)
    if shared:
        terms["shared_expert_activations"] = _mlp_activations(model, tokens * shared / tensor, linear_out)
    return terms


def layer_activation_terms(model: Any, *, precision: str, tensor: int, sequence_parallel: bool, micro_batch_size: int,
                           seq_length: int, device: str = "cuda", input_bytes: int | None = None, moe: bool = False,
                           expert_tensor: int | None = None) -> dict[str, float]:
    """Bytes one transformer layer keeps for backward for one micro batch, by term, without recompute.

    Args:
        input_bytes: bytes per element of the layer's input; the first layer of a stage
            gets `stage_input_bytes` (the embedding output or the pipeline's transfer).
        moe: the layer's MLP is megatron's MoE layer (experts split over `expert_tensor` ranks).
    """
    h, t = model.hidden_size, tensor
    d, heads = size.head_dim(model), model.num_attention_heads
    compute = _compute_bytes(precision)
    res = residual_bytes(model, precision)
    first_in = res if input_bytes is None else input_bytes
    tokens = seq_length * micro_batch_size
    split_tokens = tokens / t if sequence_parallel else tokens  # what sequence parallel shards
    # Under autocast a linear layer's bias is an fp32 parameter, so adding it promotes bf16 outputs to fp32.
    linear_out = FP32 if model.add_bias_linear and _bias_promotes(precision) else compute
    qkv_out = qkv_output_bytes(model, precision)
    terms: dict[str, float] = {}

    terms["attention_norm"] = _norm_saved(model, split_tokens, first_in, device)
    terms["qkv_input"] = split_tokens * h * first_in
    if getattr(model, "qk_layernorm", False):
        terms["qk_norms"] = _qk_norm_saved(model, tokens, t, precision, holds_qkv=qkv_out != compute, device=device)
    terms.update(_attention_terms(model, tokens=tokens, tensor=t, micro_batch_size=micro_batch_size, seq_length=seq_length,
                                  compute=compute, qkv_out=qkv_out, precision=precision, device=device))
    if model.position_embedding_type == "rope":
        terms["rope_tables"] = 4 * seq_length * d * qkv_out  # cos and sin for q and for k
    terms["attention_output"] = tokens * size.query_width(model) / t * compute  # the projection keeps a view of it
    if device == "cuda" and compute == FP32:
        # SDPA's memory-efficient kernel (fp32) keeps its own contiguous output; the projection's input is a copy.
        terms["attention_kernel_output"] = terms["attention_output"]

    terms["mlp_norm"] = _norm_saved(model, split_tokens, res, device)
    terms["fc1_input"] = split_tokens * h * res
    if moe:
        terms.update(_moe_terms(model, tokens=tokens, split_tokens=split_tokens, tensor=t, expert_tensor=expert_tensor or t,
                                compute=compute, linear_out=linear_out))
    else:
        terms["mlp_activations"] = _mlp_activations(model, tokens * model.ffn / t, linear_out)
    if model.hidden_dropout > 0:
        terms["dropout_masks"] = 2 * split_tokens * h * linear_out
    if precision == "fp8" and not moe:
        _fp8_linear_inputs(terms, model, split_tokens=split_tokens, tokens=tokens, tensor=t, first_in=first_in, res=res,
                           compute=compute, linear_out=linear_out)
    return terms


def _fp8_linear_inputs(terms: dict[str, float], model: Any, *, split_tokens: float, tokens: float, tensor: int,
                       first_in: int, res: int, compute: int, linear_out: int) -> None:
    """Under fp8 a TE linear keeps its input for the weight gradient as the FP8 tensor it
    multiplied (1 byte), not in bf16: the QKV, projection, fc1 and fc2 inputs. MoE experts
    are left at bf16 (their grouped GEMMs' saved inputs are not modelled)."""
    h = model.hidden_size
    terms["qkv_input"] -= split_tokens * h * (first_in - FP8)
    terms["attention_output"] -= tokens * size.query_width(model) / tensor * (compute - FP8)
    terms["fc1_input"] -= split_tokens * h * (res - FP8)
    terms["mlp_activations"] -= tokens * model.ffn / tensor * (linear_out - FP8)  # the activation's output, fc2's input


def _selective(terms: dict[str, float], model: Any, layout: Layout, seq_length: int, precision: str, device: str) -> dict[str, float]:
    """Selective recompute (megatron's `core_attn`) keeps attention's inputs as they arrive, not its internals."""
    out = {k: v for k, v in terms.items() if k not in ("attention_logsumexp", "attention_scores", "attention_kernel_output")}
    tokens = layout.micro_batch_size * seq_length
    out["attention_qkv"] = _core_attention_inputs(model, tokens, layout.tensor, qkv_output_bytes(model, precision))
    if "qk_norms" in out:  # attention_qkv now holds the QKV output
        out["qk_norms"] = _qk_norm_saved(model, tokens, layout.tensor, precision, holds_qkv=False, device=device)
    return out


def chunk_activation_bytes(model: Any, layers: int, *, precision: str, layout: Layout, seq_length: int, device: str,
                           first_stage: bool) -> float:
    """Bytes one model chunk (a pipeline stage, or one virtual chunk of it) keeps per micro batch."""
    tokens = layout.micro_batch_size * seq_length
    res = residual_bytes(model, precision)
    shard = layout.tensor if layout.sequence_parallel else 1
    if layout.recompute == "full":
        # Each layer keeps only its input; the chunk's first layer receives the stage's input.
        total = tokens / shard * model.hidden_size * (stage_input_bytes(precision) + res * (layers - 1))
        if model.position_embedding_type == "rope":
            total += seq_length * size.head_dim(model) * FP32  # the rotary table, shared by every layer
    else:
        common = dict(precision=precision, tensor=layout.tensor, sequence_parallel=layout.sequence_parallel,
                      micro_batch_size=layout.micro_batch_size, seq_length=seq_length, device=device)
        # An MoE model's chunks start with an MoE layer (layer 0 % moe_layer_freq) and hold
        # their share of MoE layers; a dense model's, none.
        routed = round(layers * size.moe_layers(model) / model.num_layers)
        kinds = [routed > 0] + [True] * max(routed - 1, 0) + [False] * (layers - max(routed, 1))

        def kept(moe: bool, **first: Any) -> float:
            terms = layer_activation_terms(model, moe=moe, expert_tensor=layout.expert_tensor_parallel_size, **common, **first)
            selective = layout.recompute == "selective"
            return sum((_selective(terms, model, layout, seq_length, precision, device) if selective else terms).values())

        each = {moe: kept(moe) for moe in set(kinds[1:])}
        total = kept(kinds[0], input_bytes=stage_input_bytes(precision)) + sum(each[moe] for moe in kinds[1:])
    if first_stage:
        index_bytes = 8  # int64 token ids, and position ids with learned positions
        total += tokens * index_bytes * (2 if model.position_embedding_type == "learned_absolute" else 1)
        if model.hidden_dropout > 0:
            total += tokens / shard * model.hidden_size * stage_input_bytes(precision)  # the embedding's dropout mask
    return total


def document_bytes(model: Any, layout: Layout, seq_length: int, precision: str, layers: int, documents: tuple[bool, bool]) -> float:
    """What packed documents (`documents` = (block-causal mask, position resets)) add per chunk forward in flight.

    The mask: megatron's bool [b, 1, s, s] and its additive copy in the attention dtype, which
    every layer's SDPA shares (models/layers.py). Restarted RoPE positions: per layer, two
    rotary tensors per token (else per position) that RoPE saves, in the attention dtype.
    Measured on CPU (saved-for-backward bytes with and without, Llama and GPT-2 shapes, fp32
    and bf16-autocast, 2 and 4 layers): within 3%.
    """
    mask, positions = documents
    b, tokens = layout.micro_batch_size, layout.micro_batch_size * seq_length
    total = b * seq_length**2 * (1 + _compute_bytes(precision)) if mask else 0.0
    if positions and model.position_embedding_type == "rope":
        total += layers * 2 * tokens * size.head_dim(model) * _compute_bytes(precision)
    return total


def logits_bytes(model: Any, layout: Layout, seq_length: int, precision: str, device: str = "cuda") -> tuple[float, float]:
    """(kept for backward, transient around the loss) for one micro batch.

    The loss keeps an fp32 softmax. On CUDA megatron's cross entropy computes it in place in
    its fp32 copy of the logits, so beside it only bf16 logits exist (in forward, their
    gradient in backward; measured on an H200: 2.08 GiB at 16 × 2048 tokens and 32k vocab),
    and nothing in fp32. On the CPU the lean layers' `F.cross_entropy` keeps a new fp32
    log-softmax: the fp32 copy (and bf16 logits under bf16) exist beside it. Where the lean
    layers stand aside on the CPU (LoRA, soft prompts, megatron's bf16) megatron's in-place
    cross entropy needs less, and the plan errs high by that copy.
    """
    tokens = layout.micro_batch_size * seq_length
    logits = tokens * -(-model.vocab_size // layout.tensor)
    kept = logits * FP32 + tokens * (1 + 8)  # softmax, target mask, masked targets
    compute = _compute_bytes(precision)
    low = compute if compute != FP32 else 0
    return kept, logits * (low if device == "cuda" else FP32 + low)


def final_norm_bytes(model: Any, precision: str, layout: Layout, seq_length: int, device: str = "cuda") -> float:
    """The final norm and the output layer's input, on the last stage."""
    tokens = layout.micro_batch_size * seq_length / (layout.tensor if layout.sequence_parallel else 1)
    res = residual_bytes(model, precision)
    return _norm_saved(model, tokens, res, device) + tokens * model.hidden_size * res


def in_flight(layout: Layout, stage: int) -> int:
    """Model-chunk micro batches whose activations a pipeline stage holds at once.

    1F1B: stage i runs pp − i forwards before its first backward. Interleaved (virtual
    chunks v): megatron warms up with 2·(pp − i − 1) + (v − 1)·pp chunk-forwards.
    """
    pp, v = layout.pipeline, layout.virtual
    chunks = layout.num_microbatches * v
    if pp == 1:
        return min(1, chunks)
    if v == 1:
        return min(pp - stage, chunks)
    return min(2 * (pp - stage - 1) + (v - 1) * pp + 1, chunks)


def rank_memory(model: Any, layout: Layout, stage: int, *, precision: str, optimizer: Any, seq_length: int | None = None,
                device: str = "cuda", documents: tuple[bool, bool] = (False, False)) -> RankMemory:
    """What one tensor-parallel rank of pipeline stage `stage` holds at its peak.

    Args:
        documents: (block-causal mask, position resets) of packed documents (`data.reset_*`, finetune `packing`).
    """
    seq = seq_length or model.seq_length
    params = size.param_count_per_rank(model, layout)[stage]
    experts = size.expert_param_count_per_rank(model, layout)[stage]
    tensors = size.param_tensors_per_rank(model, layout)[stage]
    state_bytes, _ = optimizer_state_bytes_per_param(optimizer, precision=precision)
    # llmforge shards only AdamW; other optimizers keep their full state on every DP rank.
    sharded = layout.distributed_optimizer and getattr(optimizer, "name", "adamw") == "adamw"
    opt_shards = layout.data if sharded else 1
    # Routed experts' state shards over their own replicas (the expert-data-parallel ranks).
    expert_shards = layout.expert_data if sharded else 1
    layers = model.num_layers // layout.pipeline
    last = stage == layout.pipeline - 1
    # Interleaved chunks are in flight together; they differ only by the first one's token ids.
    chunk = chunk_activation_bytes(model, layers // layout.virtual, precision=precision, layout=layout, seq_length=seq,
                                   device=device, first_stage=stage == 0)
    chunk += document_bytes(model, layout, seq, precision, layers // layout.virtual, documents)
    flights = in_flight(layout, stage)
    logits, workspace = logits_bytes(model, layout, seq, precision, device) if last else (0.0, 0.0)
    if last:
        logits += final_norm_bytes(model, precision, layout, seq, device)
    recompute_buffer = 0.0
    if layout.recompute == "full":
        # Backward rematerializes one layer at a time, with everything it would have kept.
        recompute_buffer = sum(layer_activation_terms(model, precision=precision, tensor=layout.tensor,
                                                      sequence_parallel=layout.sequence_parallel,
                                                      micro_batch_size=layout.micro_batch_size, seq_length=seq,
                                                      device=device, moe=size.moe_layers(model) > 0,
                                                      expert_tensor=layout.expert_tensor_parallel_size).values())
    return RankMemory(
        pipeline_stage=stage,
        layers=layers,
        params=params,
        in_flight_microbatches=flights,
        weights=params * weight_bytes(precision),
        gradients=params * GRAD_BYTES,
        optimizer_states=((params - experts) * state_bytes + _adam_step_bytes(optimizer, tensors)) // opt_shards
        + experts * state_bytes // expert_shards,
        activations=round(flights * chunk),
        logits=round(logits),
        loss_workspace=round(workspace),
        recompute_buffer=round(recompute_buffer),
        fp8_weights=size.layer_param_count_per_rank(model, layout)[stage] * FP8_WEIGHT_COPIES if precision == "fp8" else 0,
    )


def memory_per_rank(model: Any, layout: Layout, *, precision: str, optimizer: Any, seq_length: int | None = None,
                    device: str = "cuda", documents: tuple[bool, bool] = (False, False)) -> list[RankMemory]:
    """One RankMemory per pipeline stage, first to last, for one tensor-parallel rank of each."""
    return [rank_memory(model, layout, stage, precision=precision, optimizer=optimizer, seq_length=seq_length, device=device,
                        documents=documents)
            for stage in range(layout.pipeline)]
