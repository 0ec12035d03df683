"""Packed sequences whose documents do not see each other: block-causal masks and position resets.

Megatron-LM's `reset_position_ids`, `reset_attention_mask` and `eod_mask_loss`
(`get_ltor_masks_and_position_ids`), computed on the device from each micro batch: a
pretraining window's documents end with the end-of-document token, so token j belongs to
document k when k end-of-document tokens come before it. A packed finetune row says where
its examples start instead (`segments`, from `data.sft.pack_documents`), since a chat
template's last token need not be EOS.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from llmforge.spec.errors import UserError


@dataclass(frozen=True)
class Documents:
    """What a TrainStep does with the documents of a packed row.

    Args:
        eod_id: the end-of-document token that splits pretraining windows; None when the
            batches bring their own `segments` (packed finetune rows).
        reset_position_ids: positions restart at 0 with each document (RoPE and learned positions).
        reset_attention_mask: each token attends only to earlier tokens of its own document.
        eod_mask_loss: the target read at an end-of-document token (the next document's first
            token) carries no loss.
    """

    eod_id: int | None
    reset_position_ids: bool
    reset_attention_mask: bool
    eod_mask_loss: bool


def segments_of(tokens: torch.Tensor, eod_id: int) -> torch.Tensor:
    """[b, s] document index of each input token: how many end-of-document tokens come before it."""
    ends = (tokens == eod_id).to(torch.int32)
    return torch.cumsum(ends, dim=1) - ends


def positions_of(segments: torch.Tensor) -> torch.Tensor:
    """[b, s] position of each token within its document (segments never decrease along a row)."""
    s = segments.shape[1]
    index = torch.arange(s, device=segments.device).expand_as(segments)
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    # The index of each token's document start, carried forward along the row.
    first = torch.cummax(torch.where(starts, index, torch.zeros_like(index)), dim=1).values
    return index - first


def block_causal_mask(segments: torch.Tensor) -> torch.Tensor:
    """[b, 1, s, s] bool, megatron's convention (True = masked out): a query sees only earlier keys of its own document.

    The diagonal is always visible, so no row is empty (an empty row is NaN in softmax).
    """
    s = segments.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=segments.device).tril()
    same = segments.unsqueeze(2) == segments.unsqueeze(1)
    return ~(same & causal).unsqueeze(1)


def boundary_targets(segments: torch.Tensor) -> torch.Tensor:
    """[b, s] float: 0 where the target (the next token) belongs to another document than the input, else 1.

    The last input's target is the row's extra token, whose document is not known here: it
    counts (in a pretraining window it is the same document's unless an EOD precedes it,
    which `eod_mask_loss` masks by the token itself).
    """
    keep = torch.ones_like(segments, dtype=torch.float32)
    keep[:, :-1] = (segments[:, 1:] == segments[:, :-1]).float()
    return keep


def prepare(documents: Documents, tokens: torch.Tensor, loss_mask: torch.Tensor | None, segments: torch.Tensor | None):
    """(position ids or None, attention mask or None, loss mask or None) of one micro batch's inputs [b, s]."""
    if segments is None:
        segments = segments_of(tokens, documents.eod_id)
    elif loss_mask is not None:
        # A finetune example's first token is never a target of the example before it.
        loss_mask = loss_mask * boundary_targets(segments)
    positions = positions_of(segments) if documents.reset_position_ids else None
    mask = block_causal_mask(segments) if documents.reset_attention_mask else None
    if documents.eod_mask_loss and documents.eod_id is not None:
        keep = (tokens != documents.eod_id).float()
        loss_mask = keep if loss_mask is None else loss_mask * keep
    return positions, mask, loss_mask


DOCUMENT_OPTIONS = ("reset_position_ids", "reset_attention_mask", "eod_mask_loss")


def pretraining_documents(data, tokenizer) -> Documents | None:
    """The spec's `data` options over the run's tokenizer; None when all are off."""
    flags = {key: getattr(data, key) for key in DOCUMENT_OPTIONS}
    if not any(flags.values()):
        return None
    if tokenizer.eos_id is None:
        on = next(key for key, value in flags.items() if value)
        raise UserError(f"data.{on} splits packed windows at the end-of-document token, and the char tokenizer without add_eos adds none",
                        f"set tokenizer.add_eos: true, or turn data.{on} off")
    return Documents(tokenizer.eos_id, **flags)


# A packed finetune row: examples never see each other, positions restart, each keeps its loss mask.
PACKED_EXAMPLES = Documents(None, reset_position_ids=True, reset_attention_mask=True, eod_mask_loss=False)


def with_documents(hooks, documents: Documents | None):
    """The stage's hooks, their TrainStep given `documents` (unchanged when None)."""
    if documents is not None:
        step_class = hooks.step_class()
        hooks.step_class = lambda: functools.partial(step_class, documents=documents)
    return hooks
