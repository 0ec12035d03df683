"""Parameter and FLOP counts of the `gpt` model, from its options alone (no torch).

`plan` uses them to cost a spec before anything is built, and the training loop uses
`flops_per_token` for MFU. The counts follow what megatron-core's GPTModel allocates:

- per layer: two norms (LayerNorm has weight and bias, RMSNorm only a weight), the fused
  QKV projection (grouped-query aware, heads `kv_channels` wide), the output projection,
  and the MLP, whose first projection is twice as wide when the activation is gated (swiglu);
- `qk_layernorm` adds a query and a key norm one head wide, shared by the heads and
  replicated on every tensor-parallel rank;
- `add_bias_linear` adds a bias to the four linear layers, `add_qkv_bias` to the QKV
  projection only. A row-parallel layer's bias (attention output, second MLP projection)
  is replicated on every tensor-parallel rank;
- the word embedding, learned position embeddings when used (replicated over TP), the
  final norm, and an output projection without bias when embeddings are untied.

Tensor parallelism splits the vocabulary and the linear layers' wide dimension; the
vocabulary share is rounded up, as a padded vocabulary would be.

An MoE layer (`num_moe_experts`, every `moe_layer_freq`-th layer) replaces the MLP with a
router (experts × hidden, replicated over TP), `num_moe_experts` expert MLPs of width
`moe_ffn_hidden_size` (split over EP, each over expert TP) and an optional shared expert of
width `moe_shared_expert_intermediate_size` (split over TP), with `moe_shared_expert_gate` a
[1, hidden] sigmoid gate on it (replicated). A token passes through
`moe_router_topk` experts: the *active* parameters (`active_param_count`) count those, and
the FLOPs per token come from them.
"""

from __future__ import annotations

from typing import Any, Protocol


class GPTShape(Protocol):
    """The attributes of the `gpt` options model that size the network.

    `kv_channels`, `add_qkv_bias` and `qk_layernorm` are read with defaults (hidden /
    heads, off, off), so a plugin model written before them is sized as it was.
    """

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    vocab_size: int
    seq_length: int
    position_embedding_type: str
    normalization: str
    activation: str
    add_bias_linear: bool
    untie_embeddings_and_output_weights: bool

    @property
    def kv_groups(self) -> int: ...
    @property
    def ffn(self) -> int: ...
    @property
    def max_positions(self) -> int: ...


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def head_dim(model: GPTShape) -> int:
    return getattr(model, "kv_channels", None) or model.hidden_size // model.num_attention_heads


def query_width(model: GPTShape) -> int:
    """Features of all query heads together: the attention output projection's input."""
    return model.num_attention_heads * head_dim(model)


def qkv_width(model: GPTShape) -> int:
    """Output features of the fused QKV projection: all query heads plus the key/value groups."""
    return query_width(model) + 2 * model.kv_groups * head_dim(model)


def _qkv_bias(model: GPTShape) -> bool:
    return model.add_bias_linear or getattr(model, "add_qkv_bias", False)


def _qk_norms(model: GPTShape) -> int:
    """Norm layers inside attention: a query and a key norm with `qk_layernorm`, else none."""
    return 2 if getattr(model, "qk_layernorm", False) else 0


def fc1_width(model: GPTShape) -> int:
    """Output features of the first MLP projection (gate and up halves when gated)."""
    return model.ffn * (2 if model.activation == "swiglu" else 1)


def norm_params(model: GPTShape) -> int:
    return model.hidden_size * (2 if model.normalization == "LayerNorm" else 1)


def _mlp_params(model: GPTShape, width: int, tensor_parallel: int) -> int:
    """A (dense, expert or shared) MLP of `width` on one tensor-parallel rank."""
    h, t, bias = model.hidden_size, tensor_parallel, model.add_bias_linear
    fc1 = width * (2 if model.activation == "swiglu" else 1)
    return h * fc1 // t + (fc1 // t if bias else 0) + width * h // t + (h if bias else 0)


def num_experts(model: GPTShape) -> int | None:
    return getattr(model, "num_moe_experts", None)


def is_moe_layer(model: GPTShape, layer: int) -> bool:
    """Whether global layer `layer` (from 0) has experts: every `moe_layer_freq`-th one."""
    return num_experts(model) is not None and layer % getattr(model, "moe_layer_freq", 1) == 0


def moe_layers(model: GPTShape) -> int:
    return sum(is_moe_layer(model, layer) for layer in range(model.num_layers))


def _expert_ffn(model: GPTShape) -> int:
    return getattr(model, "moe_ffn_hidden_size", None) or model.ffn


def expert_params(model: GPTShape, expert_tensor_parallel: int = 1) -> int:
    """One routed expert's parameters on one expert-tensor-parallel rank."""
    return _mlp_params(model, _expert_ffn(model), expert_tensor_parallel)


def _attention_params(model: GPTShape, tensor_parallel: int) -> int:
    h, t = model.hidden_size, tensor_parallel
    qkv = h * qkv_width(model) // t + (qkv_width(model) // t if _qkv_bias(model) else 0)
    proj = query_width(model) * h // t + (h if model.add_bias_linear else 0)
    qk_norms = _qk_norms(model) * head_dim(model) * (2 if model.normalization == "LayerNorm" else 1)
    return 2 * norm_params(model) + qk_norms + qkv + proj


def _router_and_shared(model: GPTShape, tensor_parallel: int) -> int:
    shared = getattr(model, "moe_shared_expert_intermediate_size", None)
    gate = model.hidden_size if getattr(model, "moe_shared_expert_gate", False) else 0  # [1, hidden], replicated over TP
    return num_experts(model) * model.hidden_size + (_mlp_params(model, shared, tensor_parallel) + gate if shared else 0)


def layer_params(model: GPTShape, tensor_parallel: int = 1, *, layer: int = 0, expert_parallel: int = 1,
                 expert_tensor_parallel: int | None = None, active: bool = False) -> int:
    """Parameters of transformer layer `layer` on one tensor-parallel rank.

    An MoE layer holds its experts split over `expert_parallel` ranks, each over
    `expert_tensor_parallel` (default: TP); `active` counts only the top-k experts a token uses.
    """
    attention = _attention_params(model, tensor_parallel)
    if not is_moe_layer(model, layer):
        return attention + _mlp_params(model, model.ffn, tensor_parallel)
    etp = expert_tensor_parallel or tensor_parallel
    experts = model.moe_router_topk if active else num_experts(model) // expert_parallel
    return attention + _router_and_shared(model, tensor_parallel) + experts * expert_params(model, etp)


def layer_tensors(model: GPTShape, layer: int = 0, expert_parallel: int = 1) -> int:
    """Parameter tensors of one layer (Adam keeps a `step` scalar for each)."""
    norm = 2 if model.normalization == "LayerNorm" else 1
    biases = 4 if model.add_bias_linear else int(_qkv_bias(model))
    dense = (2 + _qk_norms(model)) * norm + 4 + biases
    if not is_moe_layer(model, layer):
        return dense
    shared = 2 if getattr(model, "moe_shared_expert_intermediate_size", None) else 0
    shared += 1 if shared and getattr(model, "moe_shared_expert_gate", False) else 0
    return dense - 2 + 1 + shared + 2 * num_experts(model) // expert_parallel  # router, shared expert, experts


def embedding_params(model: GPTShape, tensor_parallel: int = 1) -> int:
    """Input embedding lookup tables: word (vocab split over TP) and learned positions."""
    words = _ceil_div(model.vocab_size, tensor_parallel) * model.hidden_size
    positions = model.max_positions * model.hidden_size if model.position_embedding_type == "learned_absolute" else 0
    return words + positions


def output_params(model: GPTShape, tensor_parallel: int = 1) -> int:
    """The output projection's own weight (0 when it reuses the input embedding)."""
    if not model.untie_embeddings_and_output_weights:
        return 0
    return _ceil_div(model.vocab_size, tensor_parallel) * model.hidden_size


def param_count(model: GPTShape) -> int:
    """Total parameters of the model, each counted once (a tied output layer adds none)."""
    layers = sum(layer_params(model, layer=i) for i in range(model.num_layers))
    return layers + embedding_params(model) + norm_params(model) + output_params(model)


def active_param_count(model: GPTShape) -> int:
    """Parameters one token passes through: an MoE layer's router, top-k experts and shared expert (all of a dense model)."""
    layers = sum(layer_params(model, layer=i, active=True) for i in range(model.num_layers))
    return layers + embedding_params(model) + norm_params(model) + output_params(model)


def layers_per_stage(model: GPTShape, parallelism: Any) -> int:
    return model.num_layers // parallelism.pipeline_model_parallel_size


def param_count_per_rank(model: GPTShape, parallelism: Any) -> list[int]:
    """Parameters held by one tensor-parallel rank of each pipeline stage, first to last.

    The first stage holds the embeddings, the last the final norm and output layer. With
    tied embeddings and more than one stage, the last stage keeps its own copy of the
    word embedding for the output projection (megatron keeps the two in sync), so it is
    counted there too.
    """
    t, pp = parallelism.tensor_model_parallel_size, parallelism.pipeline_model_parallel_size
    per_stage = layer_param_count_per_rank(model, parallelism)
    per_stage[0] += embedding_params(model, t)
    out = output_params(model, t)
    if pp > 1 and not model.untie_embeddings_and_output_weights:
        out = _ceil_div(model.vocab_size, t) * model.hidden_size
    per_stage[-1] += norm_params(model) + out
    return per_stage


def layer_param_count_per_rank(model: GPTShape, parallelism: Any) -> list[int]:
    """Of `param_count_per_rank`, the transformer layers' parameters (no embeddings, final norm or output layer)."""
    t = parallelism.tensor_model_parallel_size
    return [sum(layer_params(model, t, layer=i, **_experts_of(parallelism)) for i in _stage_layers(model, parallelism, stage))
            for stage in range(parallelism.pipeline_model_parallel_size)]


def _stage_layers(model: GPTShape, parallelism: Any, stage: int) -> range:
    per = layers_per_stage(model, parallelism)
    return range(stage * per, (stage + 1) * per)


def _experts_of(parallelism: Any) -> dict[str, int | None]:
    return {"expert_parallel": getattr(parallelism, "expert_model_parallel_size", 1),
            "expert_tensor_parallel": getattr(parallelism, "expert_tensor_parallel_size", None)}


def expert_param_count_per_rank(model: GPTShape, parallelism: Any) -> list[int]:
    """Of `param_count_per_rank`, the routed experts' parameters: the distributed optimizer
    shards these over the expert-data-parallel ranks, the rest over the data-parallel ones."""
    if num_experts(model) is None:
        return [0] * parallelism.pipeline_model_parallel_size
    experts = _experts_of(parallelism)
    etp = experts["expert_tensor_parallel"] or parallelism.tensor_model_parallel_size
    per_layer = num_experts(model) // experts["expert_parallel"] * expert_params(model, etp)
    return [per_layer * sum(is_moe_layer(model, i) for i in _stage_layers(model, parallelism, stage))
            for stage in range(parallelism.pipeline_model_parallel_size)]


def param_tensors_per_rank(model: GPTShape, parallelism: Any) -> list[int]:
    """Parameter tensors held by one rank of each pipeline stage (same split as the counts)."""
    pp = parallelism.pipeline_model_parallel_size
    ep = _experts_of(parallelism)["expert_parallel"]
    per_stage = [sum(layer_tensors(model, i, ep) for i in _stage_layers(model, parallelism, stage)) for stage in range(pp)]
    per_stage[0] += 1 + (model.position_embedding_type == "learned_absolute")
    has_output = model.untie_embeddings_and_output_weights or pp > 1
    per_stage[-1] += (2 if model.normalization == "LayerNorm" else 1) + has_output
    return per_stage


def matmul_params(model: GPTShape) -> int:
    """N in 6·N: every active parameter except the input embedding lookups, plus the output projection.

    A lookup does no multiply-adds, while the output projection does vocab × hidden of
    them per token whether or not its weight is tied to the embedding (the usual
    convention of Kaplan et al. and Megatron). Norm weights and biases are included;
    they are a rounding error. An MoE layer counts the top-k experts a token goes through.
    """
    return active_param_count(model) - embedding_params(model) + model.vocab_size * model.hidden_size - output_params(model)


def attention_flops_per_token(model: GPTShape, seq_length: int | None = None) -> float:
    """6·L·h·s: forward plus backward of the causal score and value products.

    QKᵀ and AV cost 2·s·h multiply-adds each per token and layer over the full s×s
    square; a causal kernel (SDPA, flash) computes half of it, and backward is twice
    forward: 3 × (2·2·s·h) / 2 = 6·s·h. PaLM's 12·L·h·s counts the full square. h is
    the width of all query heads, which `kv_channels` may set apart from the model's.
    """
    s = seq_length or model.seq_length
    return 6.0 * model.num_layers * query_width(model) * s


def flops_per_token(model: GPTShape, seq_length: int | None = None) -> float:
    """Model FLOPs to train on one token, forward plus backward: 6·N + 6·L·h·s.

    N is `matmul_params` (input embeddings excluded, output projection included). The
    count excludes recompute, so MFU computed from it is model FLOPs utilization.
    """
    return 6.0 * matmul_params(model) + attention_flops_per_token(model, seq_length)
