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


def layer_params(model: GPTShape, tensor_parallel: int = 1) -> int:
    """Parameters of one transformer layer on one tensor-parallel rank."""
    h, t, bias = model.hidden_size, tensor_parallel, model.add_bias_linear
    qkv = h * qkv_width(model) // t + (qkv_width(model) // t if _qkv_bias(model) else 0)
    proj = query_width(model) * h // t + (h if bias else 0)
    fc1 = h * fc1_width(model) // t + (fc1_width(model) // t if bias else 0)
    fc2 = model.ffn * h // t + (h if bias else 0)
    qk_norms = _qk_norms(model) * head_dim(model) * (2 if model.normalization == "LayerNorm" else 1)
    return 2 * norm_params(model) + qk_norms + qkv + proj + fc1 + fc2


def layer_tensors(model: GPTShape) -> int:
    """Parameter tensors of one layer (Adam keeps a `step` scalar for each)."""
    norm = 2 if model.normalization == "LayerNorm" else 1
    biases = 4 if model.add_bias_linear else int(_qkv_bias(model))
    return (2 + _qk_norms(model)) * norm + 4 + biases


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
    return model.num_layers * layer_params(model) + embedding_params(model) + norm_params(model) + output_params(model)


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
    per_stage = [layers_per_stage(model, parallelism) * layer_params(model, t) for _ in range(pp)]
    per_stage[0] += embedding_params(model, t)
    out = output_params(model, t)
    if pp > 1 and not model.untie_embeddings_and_output_weights:
        out = _ceil_div(model.vocab_size, t) * model.hidden_size
    per_stage[-1] += norm_params(model) + out
    return per_stage


def param_tensors_per_rank(model: GPTShape, parallelism: Any) -> list[int]:
    """Parameter tensors held by one rank of each pipeline stage (same split as the counts)."""
    pp = parallelism.pipeline_model_parallel_size
    per_stage = [layers_per_stage(model, parallelism) * layer_tensors(model) for _ in range(pp)]
    per_stage[0] += 1 + (model.position_embedding_type == "learned_absolute")
    has_output = model.untie_embeddings_and_output_weights or pp > 1
    per_stage[-1] += (2 if model.normalization == "LayerNorm" else 1) + has_output
    return per_stage


def matmul_params(model: GPTShape) -> int:
    """N in 6·N: every parameter except the input embedding lookups, plus the output projection.

    A lookup does no multiply-adds, while the output projection does vocab × hidden of
    them per token whether or not its weight is tied to the embedding (the usual
    convention of Kaplan et al. and Megatron). Norm weights and biases are included;
    they are a rounding error.
    """
    return param_count(model) - embedding_params(model) + model.vocab_size * model.hidden_size - output_params(model)


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
