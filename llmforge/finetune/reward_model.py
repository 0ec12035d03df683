"""A reward model: the GPT's final hidden state at a sequence's last token, through a scalar head.

The head is a child of the GPTModel (`reward_head`), so the model's own sharded state dict
saves and loads it with the rest; it is replicated over TP ranks, which all see the same
hidden state. The vocabulary projection is skipped by running the model with
`post_process` off (the decoder still applies its final norm).
"""

from __future__ import annotations

import contextlib
import hashlib

import torch

HEAD = "reward_head"


class ScalarHead(torch.nn.Linear):
    """[hidden → 1] in the model's parameter dtype, computed in fp32: a bf16 score would keep
    three significant digits, and Bradley-Terry reads differences of scores."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x.float(), self.weight.float(), self.bias.float())


def attach_reward_head(model_chunks: list[torch.nn.Module], *, seed: int) -> None:
    """Give each chunk's GPTModel a fresh scalar head (normal(0, 1/sqrt(hidden + 1)), bias 0), alike in every layout
    (drawn in fp32, then rounded to the model's dtype).

    An untied output layer is frozen: a reward model never projects onto the vocabulary.
    """
    from llmforge.models.init import unwrap

    for chunk in model_chunks:
        model = unwrap(chunk)
        if not model.post_process:
            continue  # under pipeline parallelism only the last stage reads a score
        hidden = model.config.hidden_size
        key = int.from_bytes(hashlib.sha256(f"{seed}:{HEAD}".encode()).digest()[:8], "little")
        weight = torch.randn(1, hidden, generator=torch.Generator().manual_seed(key)) / (hidden + 1) ** 0.5
        # Like every parameter, in the model's dtype (bf16 under megatron's bf16: the optimizer keeps fp32 masters).
        head = ScalarHead(hidden, 1, device=next(model.parameters()).device, dtype=model.config.params_dtype)
        with torch.no_grad():
            head.weight.copy_(weight)
            head.bias.zero_()
        model.add_module(HEAD, head)
        if not model.share_embeddings_and_output_weights:
            # The vocabulary projection is never run; frozen, the optimizer leaves it alone.
            model.output_layer.weight.requires_grad_(False)


@contextlib.contextmanager
def _hidden_states_only(model):
    # GPTModel returns the decoder's output, before the output layer, when post_process is off.
    model.post_process = False
    try:
        yield
    finally:
        model.post_process = True


def sequence_scores(model: torch.nn.Module, tokens: torch.Tensor, positions: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Reward [b] of each row of `tokens` [b, s], read at its position `index` [b] (its last real token)."""
    from megatron.core import tensor_parallel

    from llmforge.models.init import unwrap

    gpt = unwrap(model)
    with _hidden_states_only(gpt):
        hidden = model(tokens, positions, None)  # [s, b, h]
    if gpt.config.sequence_parallel:
        # Every TP rank goes on with the same (replicated) head, so the backward splits, not sums.
        hidden = tensor_parallel.gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False)
    last = hidden[index, torch.arange(tokens.shape[0], device=tokens.device)]
    return getattr(gpt, HEAD)(last.float()).squeeze(-1)


def score_sequences(server, sequences: list[list[int]], *, micro_batch_size: int, pad_id: int, max_length: int | None = None,
                    shared: bool = True) -> list[float]:
    """Rewards of whole token sequences through a `runtime.serve.ModelServer` over the reward
    model's chunks (any layout); a collective.

    Args:
        max_length: read at most this many tokens of each, as the reward model was trained
            (its stage's max_seq_length + 1); a longer sequence is scored at its cut.
    """
    if max_length is not None:
        sequences = [s[:max_length] for s in sequences]
    return server.scores(sequences, micro_batch_size=micro_batch_size, pad_id=pad_id, head=HEAD, shared=shared)
