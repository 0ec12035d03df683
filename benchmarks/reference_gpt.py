"""The plain-PyTorch baseline for the training benchmarks: a compact GPT of the `gpt` options' shape.

Written as a careful engineer would write it for speed, so that a ratio ≥ 1 means
something: one fused QKV projection, `F.scaled_dot_product_attention` with `is_causal`,
the functional norms, RoPE tables computed once, batch-first tensors (no transposes
around attention beyond the head split), and AdamW with `fused=True`, the same implementation
llmforge's `adamw` uses (the kernel must not decide a ratio). The shape, the
initialization (normal(0, std), residual outputs scaled by 1/sqrt(2 · layers)) and the
weight-decay groups follow llmforge's `gpt` model, so both sides do the same arithmetic.
bf16 is autocast over fp32 parameters, as in llmforge.

torch is imported at module level: this module is only ever imported by benchmarks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Shape:
    """The sizing keys of llmforge's `gpt` options (`llmforge.spec.components.GPTModel`)."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    kv_groups: int
    ffn: int
    vocab_size: int
    max_positions: int
    position_embedding_type: str = "learned_absolute"
    rotary_base: int = 10000
    normalization: str = "LayerNorm"
    norm_epsilon: float = 1e-5
    activation: str = "gelu"
    add_bias_linear: bool = True
    tied: bool = True
    init_method_std: float = 0.02

    @classmethod
    def of(cls, options: Any) -> Shape:
        """The shape of a `gpt` options model (GPTModel)."""
        return cls(
            num_layers=options.num_layers,
            hidden_size=options.hidden_size,
            num_attention_heads=options.num_attention_heads,
            kv_groups=options.kv_groups,
            ffn=options.ffn,
            vocab_size=options.vocab_size,
            max_positions=options.max_positions,
            position_embedding_type=options.position_embedding_type,
            rotary_base=options.rotary_base,
            normalization=options.normalization,
            norm_epsilon=options.norm_epsilon,
            activation=options.activation,
            add_bias_linear=options.add_bias_linear,
            tied=not options.untie_embeddings_and_output_weights,
            init_method_std=options.init_method_std,
        )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


class Norm(nn.Module):
    """LayerNorm or RMSNorm through the functional op (one fused kernel each)."""

    def __init__(self, shape: Shape):
        super().__init__()
        h = shape.hidden_size
        self.rms = shape.normalization == "RMSNorm"
        self.eps = shape.norm_epsilon
        self.weight = nn.Parameter(torch.ones(h))
        self.bias = None if self.rms else nn.Parameter(torch.zeros(h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rms:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


def _rope_tables(shape: Shape) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [positions, head_dim] for rotate-half RoPE (megatron's non-interleaved form)."""
    dim = shape.head_dim
    inv_freq = 1.0 / (shape.rotary_base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    freqs = torch.outer(torch.arange(shape.max_positions, dtype=torch.float32), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class Block(nn.Module):
    def __init__(self, shape: Shape):
        super().__init__()
        h, bias = shape.hidden_size, shape.add_bias_linear
        self.heads, self.groups, self.head_dim = shape.num_attention_heads, shape.kv_groups, shape.head_dim
        self.norm1, self.norm2 = Norm(shape), Norm(shape)
        self.qkv = nn.Linear(h, h + 2 * self.groups * self.head_dim, bias=bias)
        self.proj = nn.Linear(h, h, bias=bias)
        self.gated = shape.activation == "swiglu"
        self.fc1 = nn.Linear(h, shape.ffn * (2 if self.gated else 1), bias=bias)
        self.fc2 = nn.Linear(shape.ffn, h, bias=bias)
        self.approximate = "tanh" if shape.activation == "gelu_tanh" else "none"

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        b, s, h = x.shape
        q, k, v = self.qkv(self.norm1(x)).split([h, self.groups * self.head_dim, self.groups * self.head_dim], dim=-1)
        q = q.view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k = k.view(b, s, self.groups, self.head_dim).transpose(1, 2)
        v = v.view(b, s, self.groups, self.head_dim).transpose(1, 2)
        if rope is not None:
            cos, sin = rope[0][:s], rope[1][:s]
            q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.groups != self.heads)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, s, h))
        hidden = self.fc1(self.norm2(x))
        if self.gated:
            gate, up = hidden.chunk(2, dim=-1)
            hidden = F.silu(gate) * up
        else:
            hidden = F.gelu(hidden, approximate=self.approximate)
        return x + self.fc2(hidden)


class ReferenceGPT(nn.Module):
    """Decoder-only GPT; `forward(tokens)` gives logits [batch, seq, vocab]."""

    def __init__(self, shape: Shape, seed: int = 1234):
        super().__init__()
        self.shape = shape
        h = shape.hidden_size
        self.embedding = nn.Embedding(shape.vocab_size, h)
        self.positions = nn.Embedding(shape.max_positions, h) if shape.position_embedding_type == "learned_absolute" else None
        self.blocks = nn.ModuleList(Block(shape) for _ in range(shape.num_layers))
        self.final_norm = Norm(shape)
        self.output = None if shape.tied else nn.Linear(h, shape.vocab_size, bias=False)
        if shape.position_embedding_type == "rope":
            cos, sin = _rope_tables(shape)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self._initialize(seed)

    @torch.no_grad()
    def _initialize(self, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        std = self.shape.init_method_std
        residual_std = std / math.sqrt(2.0 * self.shape.num_layers)
        for name, param in self.named_parameters():
            if param.dim() >= 2:
                param.normal_(0.0, residual_std if name.endswith(("proj.weight", "fc2.weight")) else std, generator=generator)
            elif name.endswith("bias"):
                param.zero_()
            else:
                param.fill_(1.0)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embedding(tokens)
        if self.positions is not None:
            x = x + self.positions.weight[: tokens.shape[1]]
        rope = (self.rope_cos, self.rope_sin) if self.positions is None else None
        for block in self.blocks:
            x = block(x, rope)
        x = self.final_norm(x)
        return F.linear(x, self.embedding.weight if self.output is None else self.output.weight)


def build_optimizer(model: ReferenceGPT, *, lr: float, betas: tuple[float, float] = (0.9, 0.95), weight_decay: float = 0.1,
                    eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW, `fused` as llmforge's: weight decay on matrices and embeddings, none on norms and biases (as llmforge)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True)


def train_step(model: ReferenceGPT, optimizer: torch.optim.Optimizer, micro_batches: list[torch.Tensor], *, lr: float,
               precision: str = "fp32", clip_grad: float | None = None) -> float:
    """One optimizer step over micro batches [batch, seq + 1] (tokens plus the next one); returns the mean loss."""
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    total = 0.0
    for batch in micro_batches:
        with autocast:
            logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())
        # averaged over micro batches of equal size, so the grads are the global-batch mean
        (loss / len(micro_batches)).backward()
        total += loss.item()
    if clip_grad:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad, foreach=True)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total / len(micro_batches)
