"""The eval text preview: a finetune example's prompt alone, the sample cut at EOS, within the model's positions."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from llmforge.data.sft import MaskedBatch
from llmforge.runtime.evaluate import EvalContext

EOS = 9


class Tokens:
    eos_id, bos_id = EOS, 8

    def encode(self, text: str) -> list[int]:
        return [int(c) for c in text]

    def start(self) -> list[int]:
        return [self.bos_id]

    def encode_sequence(self, text: str) -> list[int]:
        return self.start() + self.encode(text)

    def decode(self, ids: list[int]) -> str:
        return "".join(map(str, ids))


def _context(seen: list[list[int]], *, max_positions: int = 0) -> EvalContext:
    def generate(ids: list[int], n: int) -> list[int]:
        seen.append(list(ids))
        return [5, 6, EOS, 7, 7][:n]  # what a model does after its EOS must not show

    return EvalContext(stage=None, tokenizer=Tokens(), val_loss=lambda iters: (0.0, 0), generate=generate,
                       log=lambda m: None, eval_iters=1, max_positions=max_positions)


def test_finetune_preview_prompts_with_the_prompt_alone_and_stops_at_eos():
    # prompt 1 2 3, response 4 EOS, padding 0: the mask marks the targets 4 and EOS (positions 2 and 3)
    tokens = torch.tensor([[1, 2, 3, 4, EOS, 0, 0]])
    masks = torch.tensor([[0, 0, 1, 1, 0, 0]], dtype=torch.float32)
    loader = SimpleNamespace(next_global_batch=lambda: MaskedBatch([tokens], [masks]))
    seen: list[list[int]] = []
    assert _context(seen).sample(None, 8, lambda: loader) == "12356" + str(EOS)
    assert seen == [[1, 2, 3]]


def test_pretraining_preview_and_a_prompt_fit_the_positions():
    loader = SimpleNamespace(next_global_batch=lambda: [torch.arange(1, 21).remainder(9).unsqueeze(0)])
    seen: list[list[int]] = []
    _context(seen).sample(None, 4, lambda: loader)
    assert len(seen[-1]) == 16
    assert _context(seen, max_positions=6).sample("12345678", 8, lambda: loader) == "67856" + str(EOS)  # prompt tail 3, 3 new at most
    assert seen[-1] == [6, 7, 8]


def test_a_prompt_preview_starts_with_bos_as_training_does():
    seen: list[list[int]] = []
    _context(seen).sample("123", 2, lambda: None)
    assert seen == [[8, 1, 2, 3]]


def test_a_padded_pretraining_sample_previews_its_first_tokens_and_none_without_val():
    # packing: documents — every target up to the padding is trained, so this is no prompt/response pair
    tokens = torch.arange(1, 41).remainder(7).unsqueeze(0)
    masks = torch.cat([torch.ones(1, 30), torch.zeros(1, 9)], dim=1)
    loader = SimpleNamespace(next_global_batch=lambda: MaskedBatch([tokens], [masks]))
    seen: list[list[int]] = []
    _context(seen).sample(None, 4, lambda: loader)
    assert seen == [tokens[0, :16].tolist()]
    assert _context(seen).sample(None, 4, None) is None  # no val split, no prompt: no preview


def test_completions_stop_at_any_of_an_imported_tokenizers_stop_ids():
    # Llama 3 Instruct's generation_config lists several eos ids: `<|eot_id|>` (6 here) ends an answer too.
    tokens = Tokens()
    tokens.stop_ids = (EOS, 6)
    context = EvalContext(stage=None, tokenizer=tokens, val_loss=lambda iters: (0.0, 0), generate=lambda ids, n: [5, 6, 7, EOS][:n],
                          log=lambda m: None, eval_iters=1)
    assert context.complete([[1, 2]], 4) == [[5]]
    assert context.sample("12", 4, None) == "812" + "56"  # BOS 8, the prompt, the answer up to its stop id
