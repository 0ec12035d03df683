"""Prompt tuning: n learned soft-prompt vectors in front of every sequence, the model frozen.

Sequences carry n placeholder tokens at positions 0..n-1; a forward hook on the model's
embedding replaces their embeddings (word and position alike) with the soft prompt. The
positions, not the token ids, mark the virtual tokens, so the rest of the vocabulary,
TrainStep, the cached decoder and sequence parallelism all work unchanged.
"""

from __future__ import annotations

import hashlib

import torch

PROMPT_KEY = "soft_prompt"


def is_prompt_key(name: str) -> bool:
    return f"{PROMPT_KEY}." in name or name.endswith(PROMPT_KEY)


class SoftPrompt(torch.nn.Module):
    """[n, hidden] vectors, replicated on every TP rank (their grads are equal there)."""

    def __init__(self, vectors: torch.Tensor, *, sequence_parallel: bool):
        super().__init__()
        self.weight = torch.nn.Parameter(vectors)
        self.sequence_parallel = sequence_parallel
        # Under SP each TP rank replaces the virtual positions of its own slice: grads are partial.
        self.weight.sequence_parallel = sequence_parallel

    @property
    def num_virtual_tokens(self) -> int:
        return self.weight.shape[0]

    def apply(self, embeddings: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Embeddings [s, b, h] (this rank's slice under SP) with the virtual positions replaced."""
        positions = position_ids.transpose(0, 1)  # [s, b]
        if self.sequence_parallel:
            from megatron.core import parallel_state

            rank = parallel_state.get_tensor_model_parallel_rank()
            size = embeddings.shape[0]
            positions = positions[rank * size:(rank + 1) * size]
        virtual = positions < self.num_virtual_tokens
        prompt = self.weight[positions.clamp(max=self.num_virtual_tokens - 1)].to(embeddings.dtype)
        return torch.where(virtual.unsqueeze(-1), prompt, embeddings)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None) -> dict:
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        return make_sharded_tensors_for_checkpoint({"weight": self.weight}, prefix, {}, sharded_offsets)


def _initial_vectors(model, num_virtual_tokens: int, *, init: str, token_ids: list[int], seed: int) -> torch.Tensor:
    """Rows of the word embedding for `token_ids` (cycled), or normal(0, init std) draws."""
    from megatron.core import parallel_state

    embedding = model.embedding.word_embeddings
    hidden = model.config.hidden_size
    if init == "random":
        key = int.from_bytes(hashlib.sha256(f"{seed}:soft_prompt".encode()).digest()[:8], "little")
        draw = torch.randn(num_virtual_tokens, hidden, generator=torch.Generator().manual_seed(key))
        # In the embedding's dtype, as every parameter (bf16 under megatron's bf16: fp32 masters in the optimizer).
        return (draw * model.config.init_method_std).to(embedding.weight.device, embedding.weight.dtype)
    ids = torch.tensor([token_ids[i % len(token_ids)] for i in range(num_virtual_tokens)], device=embedding.weight.device)
    # The vocabulary is split over TP ranks: each looks up the rows it holds, then they are summed.
    start, end = embedding.vocab_start_index, embedding.vocab_end_index
    local = (ids >= start) & (ids < end)
    rows = torch.zeros(num_virtual_tokens, hidden, dtype=embedding.weight.dtype, device=embedding.weight.device)
    rows[local] = embedding.weight.detach()[ids[local] - start]
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        torch.distributed.all_reduce(rows, group=parallel_state.get_tensor_model_parallel_group())
    return rows


def attach_soft_prompt(model_chunks: list[torch.nn.Module], *, num_virtual_tokens: int, init: str, token_ids: list[int],
                       seed: int) -> SoftPrompt | None:
    """Freeze the chunks and give the first pipeline stage's embedding a trainable soft prompt."""
    from llmforge.models.init import unwrap

    prompt = None
    for chunk in model_chunks:
        model = unwrap(chunk)
        for param in model.parameters():
            param.requires_grad_(False)
        if not model.pre_process:
            continue
        vectors = _initial_vectors(model, num_virtual_tokens, init=init, token_ids=token_ids, seed=seed)
        prompt = SoftPrompt(vectors, sequence_parallel=model.config.sequence_parallel)
        model.embedding.add_module(PROMPT_KEY, prompt)
        model.embedding.register_forward_hook(_replace_virtual(prompt), with_kwargs=True)
    return prompt


def _replace_virtual(prompt: SoftPrompt):
    def hook(module, args, kwargs, output):
        position_ids = kwargs.get("position_ids", args[1] if len(args) > 1 else None)
        return prompt.apply(output, position_ids)

    return hook


def with_virtual_tokens(ids: list[int], num_virtual_tokens: int, placeholder: int) -> list[int]:
    """`ids` behind the placeholders of the virtual tokens (unchanged if they already lead)."""
    lead = [placeholder] * num_virtual_tokens
    return ids if ids[:num_virtual_tokens] == lead else lead + list(ids)


def shift_batch(tokens: torch.Tensor, masks: torch.Tensor, num_virtual_tokens: int, placeholder: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A [b, L+1] batch and its [b, L] masks moved right behind the virtual tokens (same shapes)."""
    lead = torch.full((tokens.shape[0], num_virtual_tokens), placeholder, dtype=tokens.dtype)
    shifted = torch.cat([lead, tokens], dim=1)[:, : tokens.shape[1]]
    shifted_masks = torch.cat([torch.zeros(masks.shape[0], num_virtual_tokens, dtype=masks.dtype), masks], dim=1)[:, : masks.shape[1]]
    return shifted, shifted_masks
