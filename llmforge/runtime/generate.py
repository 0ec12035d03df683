"""The per-stage forward `runtime/serve.py` runs: this rank's chunks with a KV cache, plus the
sampling filters.

The decode path runs the model's own modules (embedding, each layer's norms, QKV and
output projections, MLP, rotary tables, final norm, output layer), so TP-sharded linears,
LoRA adapters and soft prompts apply as in training; only the attention over the cache
is ours. Tests check it against the model's full forward and against transformers.

SDPA's `is_causal=True` aligns its mask to the top-left corner, which is wrong when
fewer queries than keys attend (a decode step, or a chunk after a cached prefix); the
mask here is aligned bottom-right, and pads (left padding of a batch) are masked out.
Where both alignments agree and nothing is padded (a step from position 0, or one new
token), SDPA gets no mask tensor and uses its own causal kernels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def causal_mask(num_queries: int, num_keys: int, *, device=None) -> torch.Tensor:
    """[q, k] bool, True = may attend: the last query sees every key, earlier ones one fewer each."""
    return torch.ones(num_queries, num_keys, dtype=torch.bool, device=device).tril(num_keys - num_queries)


@dataclass
class _LayerCache:
    key: torch.Tensor  # [max_length, batch, groups, head_dim]
    value: torch.Tensor


class StageDecoder:
    """This rank's chunks of a megatron GPTModel, run incrementally over a KV cache.

    `ModelServer` drives it: `begin` a step of `new` tokens, `run_chunk` each chunk this rank
    holds (the first one from token ids, later ones from the previous stage's hidden states),
    `head` on the chunk that holds the output layer, then `end`. With `cache=False` nothing is
    kept between steps (a one-shot forward, for log-probabilities). A collective under TP:
    every TP rank runs the same tokens. Sequence parallelism must be off (`serve.sequence_parallel_off`).
    """

    def __init__(self, chunks: list[torch.nn.Module], *, batch_size: int, max_length: int, cache: bool = True):
        first = chunks[0]
        self.chunks, self.config, self.cache = chunks, first.config, cache
        self.length = 0
        self.batch_size, self.max_length = batch_size, max_length
        self.device = next(first.parameters()).device
        self.vocab_size = first.vocab_size  # the padded vocabulary: the output layer's rows, all TP ranks together
        self.key_valid = torch.zeros(batch_size, max_length, dtype=torch.bool, device=self.device)
        self.caches: dict[tuple[int, int], _LayerCache] = {}
        # Chunks that lean layers decode (models.lean.DecodeCache, with its own rotary tables): one whole model
        # on a CPU process, nothing hooked.
        from llmforge.models import lean

        self._lean = {index: lean.DecodeCache(chunk, max_length=max_length, keep=cache)
                      for index, chunk in enumerate(chunks) if lean.decode_refusal(chunk) is None}
        self.rotary = None
        if first.position_embedding_type == "rope" and len(self._lean) < len(chunks):
            self.rotary = first.rotary_pos_emb(max_length)[:, 0, 0, :]  # [max_length, rotary dim]
            # megatron's unfused RoPE takes cos and sin of the angles at every call, for q and k of
            # every layer; the tables are built once here (the same elementwise values).
            self._own_rope = not (self.config.rotary_interleaved or self.config.multi_latent_attention or self.config.apply_rope_fusion)
            self._cos, self._sin = self.rotary.cos(), self.rotary.sin()
        self._mask = None
        self._causal = False  # no mask, SDPA's own causal one: a step from position 0 without pads
        self._padded = False  # whether any cached key is a pad

    def begin(self, new: int, valid: torch.Tensor | None, segments: torch.Tensor | None = None) -> None:
        """A step of `new` tokens after the cached ones; `valid` [batch, new] is False for pads; `segments`
        [batch, new] (uncached rows only) each token's document, which alone it may attend to (runtime.documents)."""
        start, end = self.length, self.length + new
        if end > self.max_length:
            raise ValueError(f"the cache holds {self.max_length} positions; {end} requested")
        self.key_valid[:, start:end] = True if valid is None else valid
        self._padded = (self._padded and start > 0) or (valid is not None and not bool(valid.all()))
        self._mask, self._causal = None, False
        if not self._padded and segments is None and (start == 0 or new == 1):
            # Without pads or documents the mask is plain causal (top-left and bottom-right agree from position 0;
            # one new token sees every key): SDPA's own, whose kernels need no mask tensor.
            self._causal = new > 1
            return
        # [batch, 1, new, end]: bottom-right causal (see the module docstring) and no pads.
        self._mask = causal_mask(new, end, device=self.device)[None, None] & self.key_valid[:, None, None, :end]
        if segments is not None:
            self._mask = self._mask & (segments[:, None, :, None] == segments[:, None, None, :])

    def end(self, new: int) -> None:
        self.length = self.length + new if self.cache else 0
        if not self.cache:
            self.key_valid.zero_()

    def run_chunk(self, index: int, inputs: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Chunk `index` on token ids [batch, new] (if it embeds) or hidden states [new, batch, hidden]."""
        from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb

        if index in self._lean:  # batch-first inside; [new, batch, hidden] out, as below
            return self._lean[index].step(inputs, positions, self.length, self._mask, self._causal).transpose(0, 1)
        model, config = self.chunks[index], self.config
        new = positions.shape[1]
        start, end = self.length, self.length + new
        freqs = rope = None
        if self.rotary is not None:
            where = positions.transpose(0, 1)
            if self._own_rope:
                rope = (self._cos[where].unsqueeze(2), self._sin[where].unsqueeze(2))  # [new, batch, 1, dim] each
            else:
                freqs = self.rotary[where].unsqueeze(2)
        hidden = model.embedding(input_ids=inputs, position_ids=positions) if model.pre_process else inputs
        for number, layer in enumerate(model.decoder.layers):
            attention = layer.self_attention
            query, key, value = attention.get_query_key_value_tensors(layer.input_layernorm(hidden))
            if rope is not None:
                query, key = _rotate(query, *rope), _rotate(key, *rope)
            elif freqs is not None:
                query = apply_rotary_pos_emb(query, freqs, config=config)
                key = apply_rotary_pos_emb(key, freqs, config=config)
            if self.cache:
                cache = self.caches.get((index, number))
                if cache is None:
                    shape = (self.max_length, self.batch_size, *key.shape[2:])
                    cache = self.caches[(index, number)] = _LayerCache(key.new_zeros(shape), value.new_zeros(shape))
                cache.key[start:end] = key
                cache.value[start:end] = value
                key, value = cache.key[:end], cache.value[:end]
            q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [batch, heads, s, dim]
            scale = getattr(attention.core_attention, "softmax_scale", None)
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=self._mask, is_causal=self._causal, scale=scale,
                                                     enable_gqa=k.shape[1] != q.shape[1])
            context = context.permute(2, 0, 1, 3).reshape(new, self.batch_size, -1)
            residual = hidden
            hidden = layer.self_attn_bda(False, config.bias_dropout_fusion)(attention.linear_proj(context), residual, 0.0)
            residual = hidden
            hidden = layer.mlp_bda(False, config.bias_dropout_fusion)(layer.mlp(layer.pre_mlp_layernorm(hidden)), residual, 0.0)
        if model.post_process:
            hidden = model.decoder.final_layernorm(hidden)
        return hidden

    def head(self, index: int, hidden: torch.Tensor, *, labels: torch.Tensor | None = None, temperature: float = 1.0) -> torch.Tensor:
        """The output layer of chunk `index`: logits [batch, new, vocab] (fp32, gathered over TP), or
        with `labels` [batch, new] the log-probs of the labels at `temperature` [batch, new]."""
        model = self.chunks[index]
        weight = model.shared_embedding_or_output_weight() if model.share_embeddings_and_output_weights else None
        lean = self._lean.get(index)
        if labels is None:
            logits = lean.logits(hidden) if lean is not None else model.output_layer(hidden, weight=weight, runtime_gather_output=True)[0]
            return logits.transpose(0, 1).float()
        from megatron.core import tensor_parallel

        # [new, b, vocab / TP]
        logits = lean.logits(hidden) if lean is not None else model.output_layer(hidden, weight=weight, runtime_gather_output=False)[0]
        logp = -tensor_parallel.vocab_parallel_cross_entropy(logits.float() / temperature, labels.to(self.device).transpose(0, 1).contiguous())
        return logp.transpose(0, 1).float()


def score_logits(model: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """What a log-likelihood request reads of the last stage's final hidden states [new, b, h], in one
    [b, 2 new + vocab] fp32 tensor (one piece to broadcast over the pipeline): the log-prob of each label
    [b, new], the most likely id at each position [b, new] (the first on ties, over the whole vocabulary, as
    argmax over gathered logits), and the log-softmax at position `ends[i] - 1` of row i [b, vocab].

    Under TP each rank holds a slice of the vocabulary: maxima, sums and picked logits are reduced over the
    TP group, so the full logits of every position are never gathered."""
    import torch.distributed as dist

    weight = model.shared_embedding_or_output_weight() if model.share_embeddings_and_output_weights else None
    logits, _ = model.output_layer(hidden, weight=weight, runtime_gather_output=False)
    logits = logits.float().transpose(0, 1)  # [b, new, vocab / TP]
    group, size, rank = _tensor_parallel()
    width = logits.shape[-1]
    first = rank * width
    top, arg = logits.max(dim=-1)
    arg = arg + first
    if size > 1:
        best = top.clone()
        dist.all_reduce(best, op=dist.ReduceOp.MAX, group=group)
        # The lowest global id holding the maximum: what argmax over the gathered row returns.
        arg = torch.where(top == best, arg, torch.full_like(arg, torch.iinfo(arg.dtype).max))
        dist.all_reduce(arg, op=dist.ReduceOp.MIN, group=group)
        top = best
    total = (logits - top.unsqueeze(-1)).exp().sum(dim=-1)
    local = (labels.to(logits.device) - first)
    inside = (local >= 0) & (local < width)
    picked = logits.gather(-1, local.clamp(0, width - 1).unsqueeze(-1)).squeeze(-1) * inside
    if size > 1:
        dist.all_reduce(total, group=group)
        dist.all_reduce(picked, group=group)
    norm = top + total.log()  # log of the softmax's denominator
    rows = torch.arange(logits.shape[0], device=logits.device)
    last = ends.to(logits.device) - 1
    final = logits[rows, last] - norm[rows, last].unsqueeze(-1)
    if size > 1:
        parts = [torch.empty_like(final) for _ in range(size)]
        dist.all_gather(parts, final.contiguous(), group=group)
        final = torch.cat(parts, dim=-1)
    return torch.cat([picked - norm, arg.float(), final], dim=1)


def _tensor_parallel() -> tuple[object, int, int]:
    """(group, size, rank) of this rank's tensor-parallel group; (None, 1, 0) without one."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if not (dist.is_available() and dist.is_initialized() and ps.model_parallel_is_initialized()):
        return None, 1, 0
    return ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()


def _rotate(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """megatron's unfused, non-interleaved RoPE (rope_utils._apply_rotary_pos_emb_bshd) from cos/sin tables."""
    dim = cos.shape[-1]
    rotated, rest = t[..., :dim], t[..., dim:]
    x1, x2 = torch.chunk(rotated, 2, dim=-1)
    out = rotated * cos.to(t.dtype) + torch.cat((-x2, x1), dim=-1) * sin.to(t.dtype)
    return torch.cat((out, rest), dim=-1) if rest.shape[-1] else out


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
                generators: list[torch.Generator] | None = None) -> torch.Tensor:
    """One id per row (CPU): argmax at temperature 0, else a draw from the filtered, tempered
    softmax with each row's own generator, so a row's draw does not depend on its batch."""
    if temperature <= 0:
        return logits.argmax(dim=-1).cpu()
    probs = filter_logits(logits.float() / temperature, top_k=top_k, top_p=top_p).softmax(dim=-1).cpu()
    if generators is None or len(generators) != probs.shape[0]:
        raise ValueError("sampling needs one generator per row")
    return torch.stack([torch.multinomial(p, 1, generator=g)[0] for p, g in zip(probs, generators)])
