"""Sampling with a KV cache: the RL stage's rollouts and `llmforge generate` (interop/generate.py).

The decode path runs the model's own modules (embedding, each layer's norms, QKV and
output projections, MLP, rotary tables, final norm, output layer), so TP-sharded linears,
LoRA adapters and soft prompts apply as in training; only the attention over the cache
is ours. A test checks it against the model's full forward, logit for logit.

SDPA's `is_causal=True` aligns its mask to the top-left corner, which is wrong when
fewer queries than keys attend (a decode step, or a chunk after a cached prefix); the
mask here is aligned bottom-right, and pads (left padding of a batch) are masked out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llmforge.spec.errors import UserError


def causal_mask(num_queries: int, num_keys: int, *, device=None) -> torch.Tensor:
    """[q, k] bool, True = may attend: the last query sees every key, earlier ones one fewer each."""
    return torch.ones(num_queries, num_keys, dtype=torch.bool, device=device).tril(num_keys - num_queries)


@dataclass
class _LayerCache:
    key: torch.Tensor  # [max_length, batch, groups, head_dim]
    value: torch.Tensor


class KVCacheDecoder:
    """Incremental forward of a megatron GPTModel (PP=1, no sequence parallelism) with a KV cache.

    A collective under tensor parallelism: every TP rank calls it with the same tokens.
    """

    def __init__(self, model: torch.nn.Module, *, batch_size: int, max_length: int):
        from llmforge.models.init import unwrap

        model = unwrap(model)
        if not (model.pre_process and model.post_process):
            raise UserError("cached decoding needs the whole model in one process, but this one is pipeline-parallel",
                            "generate with pipeline_model_parallel_size 1")
        if model.config.sequence_parallel:
            raise UserError("cached decoding does not support sequence_parallel", "turn parallelism.sequence_parallel off for this stage")
        if max_length > model.max_sequence_length:
            raise UserError(f"prompt plus new tokens need {max_length} positions, the model has {model.max_sequence_length}",
                            "shorten the prompt or lower max_new_tokens")
        self.model, self.config = model, model.config
        self.length = 0
        self.batch_size, self.max_length = batch_size, max_length
        self.key_valid = torch.zeros(batch_size, max_length, dtype=torch.bool, device=self._device)
        self.caches: list[_LayerCache | None] = [None] * len(model.decoder.layers)
        self.rotary = None
        if model.position_embedding_type == "rope":
            self.rotary = model.rotary_pos_emb(max_length)[:, 0, 0, :]  # [max_length, rotary dim]

    @property
    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [batch, new, vocab] for `tokens` [batch, new] appended after the cached ones.

        Args:
            positions: [batch, new] position ids (rows of a left-padded batch start later).
            valid: [batch, new] False for pad tokens, which no query may attend to.
        """
        from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb

        model, config = self.model, self.config
        batch, new = tokens.shape
        start, end = self.length, self.length + new
        if end > self.max_length:
            raise ValueError(f"the cache holds {self.max_length} positions; {end} requested")
        self.key_valid[:, start:end] = True if valid is None else valid
        # [batch, 1, new, end]: bottom-right causal (see the module docstring) and no pads.
        mask = causal_mask(new, end, device=tokens.device)[None, None] & self.key_valid[:, None, None, :end]
        freqs = None
        if self.rotary is not None:
            freqs = self.rotary[positions.transpose(0, 1)].unsqueeze(2)  # [new, batch, 1, dim]

        hidden = model.embedding(input_ids=tokens, position_ids=positions)  # [new, batch, hidden]
        for index, layer in enumerate(model.decoder.layers):
            attention = layer.self_attention
            query, key, value = attention.get_query_key_value_tensors(layer.input_layernorm(hidden))
            if freqs is not None:
                query = apply_rotary_pos_emb(query, freqs, config=config)
                key = apply_rotary_pos_emb(key, freqs, config=config)
            cache = self.caches[index]
            if cache is None:
                shape = (self.max_length, batch, *key.shape[2:])
                cache = self.caches[index] = _LayerCache(key.new_zeros(shape), value.new_zeros(shape))
            cache.key[start:end] = key
            cache.value[start:end] = value
            q, k, v = (t.permute(1, 2, 0, 3) for t in (query, cache.key[:end], cache.value[:end]))  # [batch, heads, s, dim]
            scale = getattr(attention.core_attention, "softmax_scale", None)
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=k.shape[1] != q.shape[1])
            context = context.permute(2, 0, 1, 3).reshape(new, batch, -1)
            residual = hidden
            hidden = layer.self_attn_bda(False, config.bias_dropout_fusion)(attention.linear_proj(context), residual, 0.0)
            residual = hidden
            hidden = layer.mlp_bda(False, config.bias_dropout_fusion)(layer.mlp(layer.pre_mlp_layernorm(hidden)), residual, 0.0)
        hidden = model.decoder.final_layernorm(hidden)
        weight = model.shared_embedding_or_output_weight() if model.share_embeddings_and_output_weights else None
        logits, _ = model.output_layer(hidden, weight=weight, runtime_gather_output=True)
        self.length = end
        return logits.transpose(0, 1).float()


def filter_logits(logits: torch.Tensor, *, top_k: int | None = None, top_p: float = 1.0) -> torch.Tensor:
    """Logits [batch, vocab] with everything outside the top-k and the top-p nucleus set to -inf."""
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p: the first always stays.
        drop = probs.cumsum(dim=-1) - probs >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def sample_next(logits: torch.Tensor, *, temperature: float, top_k: int | None = None, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row: argmax at temperature 0, else a draw from the filtered, tempered softmax."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits.float() / temperature, top_k=top_k, top_p=top_p).softmax(dim=-1)
    # Drawn on the CPU: the generator (seeded alike on every TP rank) is a CPU one.
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)


@torch.no_grad()
def generate(model: torch.nn.Module, prompts: list[list[int]], *, max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, top_p: float = 1.0, eos_id: int | None = None, pad_id: int = 0,
             vocab_size: int | None = None, generator: torch.Generator | None = None) -> list[list[int]]:
    """Continue each prompt by up to `max_new_tokens` tokens; a row stops after its EOS (kept).

    Prompts of different lengths are left-padded into one batch. A collective under
    tensor parallelism (the same prompts and generator state on every TP rank).

    Args:
        vocab_size: the tokenizer's vocabulary; ids past it (the model's padded rows) are never drawn.
    """
    if not prompts or any(not p for p in prompts):
        raise ValueError("every prompt needs at least one token")
    model_was_training = model.training
    model.eval()
    try:
        width = max(len(p) for p in prompts)
        decoder = KVCacheDecoder(model, batch_size=len(prompts), max_length=width + max_new_tokens)
        device = decoder._device
        tokens = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        valid = torch.zeros(len(prompts), width, dtype=torch.bool)
        for row, prompt in enumerate(prompts):
            tokens[row, width - len(prompt):] = torch.tensor(prompt)
            valid[row, width - len(prompt):] = True
        tokens, valid = tokens.to(device), valid.to(device)
        positions = (valid.long().cumsum(dim=1) - 1).clamp(min=0)
        logits = decoder.forward(tokens, positions, valid)[:, -1]
        next_position = positions[:, -1] + 1
        out: list[list[int]] = [[] for _ in prompts]
        done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
        for step in range(max_new_tokens):
            if vocab_size is not None and vocab_size < logits.shape[-1]:
                logits[:, vocab_size:] = float("-inf")
            chosen = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
            for row, token in enumerate(chosen.tolist()):
                if not done[row]:
                    out[row].append(token)
            if eos_id is not None:
                done |= chosen == eos_id
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            logits = decoder.forward(chosen[:, None], next_position[:, None])[:, -1]
            next_position = next_position + 1
        return out
    finally:
        model.train(model_was_training)
