"""Layers that replace megatron's local-spec defaults: SDPA attention and torch norms with SP.

megatron's `DotProductAttention` materializes the score matrix through the CUDA global
memory buffer and is 10-25% slower on CPU than `F.scaled_dot_product_attention`, which
also dispatches to flash attention on a GPU. `WrappedTorchNorm` refuses sequence
parallelism, although a torch norm works under it once its grads are summed over TP.
"""

from __future__ import annotations

import contextlib
import weakref

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.models.gpt.gpt_model import GPTModel as MegatronGPTModel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


class SDPACoreAttention(MegatronModule):
    """Core attention over `[s, b, heads, dim]` tensors, returning `[s, b, heads * dim]`.

    Query groups (GQA) go to SDPA's `enable_gqa`; megatron's mask convention is True =
    masked out. Attention dropout runs under the model-parallel RNG fork when sequence
    parallelism is off, as in megatron, so TP shards draw different masks.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        **unused,
    ):
        super().__init__(config=config)
        self.attn_mask_type = attn_mask_type
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.softmax_scale = softmax_scale

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if attention_bias is not None or packed_seq_params is not None:
            raise NotImplementedError("SDPA core attention takes no attention bias or packed sequences; use the TransformerEngine spec")
        mask_type = attn_mask_type or self.attn_mask_type
        causal = mask_type in (AttnMaskType.causal, AttnMaskType.padding_causal)
        keep = None
        if attention_mask is not None and mask_type != AttnMaskType.padding_causal:
            keep = _shared_bias(attention_mask, query.dtype)
        elif attention_mask is not None:
            sq, skv = query.shape[0], key.shape[0]
            keep = ~attention_mask & torch.ones(sq, skv, dtype=torch.bool, device=query.device).tril(skv - sq)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, dim]
        dropout_p = self.dropout_p if self.training else 0.0
        fork = tensor_parallel.get_cuda_rng_tracker().fork() if dropout_p > 0 and not self.config.sequence_parallel else contextlib.nullcontext()
        with fork:
            out = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=keep,
                dropout_p=dropout_p,
                is_causal=causal and keep is None,
                scale=self.softmax_scale,
                enable_gqa=k.shape[1] != q.shape[1],
            )
        s, b = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)


_BIAS: dict[str, object] = {}


def _shared_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """megatron's bool mask (True = masked out) as SDPA's additive mask, built once per mask and dtype.

    SDPA saves for backward its own float copy of a bool mask, [b, 1, s, s] per layer; one
    shared additive mask is saved once for every layer of the micro batch (the same values:
    SDPA's copy is this one).
    """
    ref = _BIAS.get("mask")
    if ref is not None and ref() is mask and _BIAS["dtype"] == dtype:
        return _BIAS["bias"]
    bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    _BIAS.update(mask=weakref.ref(mask), dtype=dtype, bias=bias)
    return bias


class GPTModel(MegatronGPTModel):
    """megatron's GPTModel whose rotary embedding can follow the position ids.

    megatron's RoPE reads only the sequence length (positions 0..s-1, whatever `position_ids`
    say); packed documents whose positions restart (`data.reset_position_ids`) call it with
    `document_positions=True`, and each token's rotation is then its own position's.
    """

    _document_positions = False

    def forward(self, input_ids, position_ids, attention_mask, *args, document_positions: bool = False, **kwargs):
        from llmforge.models import lean

        if not args and lean.model_refusal(self, input_ids, kwargs) is None:
            return lean.model_forward(self, input_ids, position_ids, attention_mask, kwargs.get("labels"), document_positions)
        args = (input_ids, position_ids, attention_mask, *args)
        self._document_positions = document_positions
        try:
            return super().forward(*args, **kwargs)
        finally:
            self._document_positions = False

    def _preprocess(self, *args, **kwargs):
        out = super()._preprocess(*args, **kwargs)
        positions = kwargs.get("position_ids")
        if self._document_positions and out[1] is not None and positions is not None:
            # The table [s, 1, 1, dim] holds positions 0..s-1 and every restarted position is below s.
            out = (out[0], out[1][:, 0][positions.t()], *out[2:])  # [s, b, 1, dim]
        return out


class FP32RMSNorm(torch.nn.RMSNorm):
    """RMSNorm computed in fp32, returned in its input's dtype.

    Under bf16 autocast the input arrives in bf16 while the weight stays an fp32 master
    weight, and autocast leaves `rms_norm` alone: torch's kernel then takes its unfused path
    with a dtype-mismatch warning. Upcasting the input gives the same values and gradients.
    Under megatron's bf16 the weight is bf16 too and is upcast alike (as TE's norms compute).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        return F.rms_norm(x.float(), self.normalized_shape, weight, self.eps).to(x.dtype)


class TorchNorm:
    """torch LayerNorm or RMSNorm (per `config.normalization`) usable with sequence parallelism.

    Under SP each TP rank normalizes its own slice of the sequence, so the norm's grads are
    partial: tagging the parameters `sequence_parallel` makes megatron's
    `finalize_model_grads` sum them over the TP group (without it: 9e-5 off by step 2).
    As the per-head query and key norms (`qk_layernorm`), each rank normalizes only its own
    heads, so their grads are partial with or without SP; megatron sums those by name.
    """

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **unused) -> torch.nn.Module:
        if config.normalization == "RMSNorm":
            norm = FP32RMSNorm(hidden_size, eps=eps)
        else:
            norm = torch.nn.LayerNorm(hidden_size, eps=eps)
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm
