"""Cached decoding (`StageDecoder`, `ModelServer`) gives the logits of a full recomputation, for both model shapes.

The megatron work runs in one child process (`python test_generate.py --out facts.json`),
which writes the largest logit differences it measured; the tests then judge them. The
sampling filters are plain torch and are tested here directly.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from tests.child import worker_facts
import torch

from llmforge.models.presets import shrink
from llmforge.runtime.generate import causal_mask, filter_logits, sample_next

SHAPES = {
    "gpt2": shrink("gpt2-124m", vocab_size=96, seq_length=24),
    "llama": shrink("llama2-7b", vocab_size=96, seq_length=24, num_query_groups=2),
}
TOLERANCE = 1e-5


# --- the worker ----------------------------------------------------------------------------


def _full_logits(model, tokens):
    positions = torch.arange(tokens.shape[1]).expand(tokens.shape[0], -1)
    return model(tokens, positions, None, runtime_gather_output=True).float()


def _facts(options: dict) -> dict:
    from llmforge.models.gpt import build_gpt
    from llmforge.runtime.generate import StageDecoder
    from llmforge.runtime.serve import ModelServer
    from llmforge.spec.components import GPTModel
    from llmforge.spec.schema import ParallelismConfig

    (model,) = build_gpt(GPTModel(**options), ParallelismConfig(), precision="fp32", seed=5)
    model.eval()
    # Wider than the init's weights so that attention is far from uniform.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("linear_qkv.weight"):
                param.mul_(8)
    tokens = torch.randint(0, options["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = _full_logits(model, tokens)

    server = ModelServer([model])

    def cached(chunks: list[int], mask_fn=None) -> torch.Tensor:
        decoder = StageDecoder([model], batch_size=2, max_length=12)
        outs, start = [], 0
        for size in chunks:
            piece = tokens[:, start:start + size]
            positions = torch.arange(start, start + size).expand(2, -1)
            outs.append(server._forward(piece, positions, None, decoder=decoder))
            start += size
        return torch.cat(outs, dim=1)

    facts = {
        "prefill_then_steps": (cached([5] + [1] * 7) - full).abs().max().item(),
        "chunk_after_prefix": (cached([4, 3, 5]) - full).abs().max().item(),
        "one_token_at_a_time": (cached([1] * 12) - full).abs().max().item(),
    }
    # The trap the decoder avoids: SDPA's is_causal mask for 3 queries over 7 keys.
    import llmforge.runtime.generate as gen

    right = gen.causal_mask
    gen.causal_mask = lambda q, k, device=None: torch.ones(q, k, dtype=torch.bool).tril()  # top-left aligned
    try:
        facts["top_left_mask_chunk"] = (cached([4, 3, 5]) - full).abs().max().item()
    finally:
        gen.causal_mask = right

    # A left-padded batch: each row's last logits match that prompt alone, unpadded.
    prompts = [tokens[0, :3].tolist(), tokens[1, :7].tolist()]
    decoder = StageDecoder([model], batch_size=2, max_length=7)
    padded = torch.zeros(2, 7, dtype=torch.long)
    valid = torch.zeros(2, 7, dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        padded[row, 7 - len(prompt):] = torch.tensor(prompt)
        valid[row, 7 - len(prompt):] = True
    positions = (valid.long().cumsum(1) - 1).clamp(min=0)
    batch_last = server._forward(padded, positions, valid, decoder=decoder)[:, -1]
    with torch.no_grad():
        alone = [_full_logits(model, torch.tensor([p]))[0, -1] for p in prompts]
    facts["left_padded_batch"] = max((batch_last[i] - alone[i]).abs().max().item() for i in range(2))

    # Greedy generation through the cache equals greedy full recomputation, token for token.
    greedy = server.generate(prompts, max_new_tokens=6)
    reference = []
    for prompt in prompts:
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(6):
                ids.append(int(_full_logits(model, torch.tensor([ids]))[0, -1].argmax()))
        reference.append(ids[len(prompt):])
    facts["greedy"] = greedy
    facts["greedy_reference"] = reference
    facts["top_k_1_equals_greedy"] = server.generate(prompts, max_new_tokens=6, temperature=1.3, top_k=1, seed=0) == greedy
    sampled = [server.generate(prompts, max_new_tokens=6, temperature=1.0, seed=s) for s in (3, 3, 4)]
    facts["sampling_seeded"] = [sampled[0] == sampled[1], sampled[0] == sampled[2]]
    # A row's draws depend on its index and the seed, not on what else is in the batch.
    facts["row_alone_equals_in_batch"] = server.generate(prompts[:1], max_new_tokens=6, temperature=1.0, seed=3)[0] == sampled[0][0]
    facts["batch_size_1_equals_whole"] = server.generate(prompts, max_new_tokens=6, temperature=1.0, seed=3, batch_size=1) == sampled[0]
    stop = greedy[0][2]
    facts["eos_stop"] = server.generate(prompts[:1], max_new_tokens=6, stop_ids=[stop])
    facts["eos_token"] = stop
    # Log-probabilities of given rows equal log_softmax of the full forward's logits at the targets.
    rows = torch.cat([tokens, tokens[:, :1]], dim=1)
    reference_logp = torch.log_softmax(full, dim=-1).gather(-1, rows[:, 1:, None])[..., 0]
    facts["logprobs"] = (server.logprobs(rows, micro_batch_size=1) - reference_logp).abs().max().item()
    tempered = torch.log_softmax(full / 0.7, dim=-1).gather(-1, rows[:, 1:, None])[..., 0]
    facts["logprobs_tempered"] = (server.logprobs(rows, micro_batch_size=2, temperature=0.7) - tempered).abs().max().item()
    return facts


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    from llmforge.runtime.distributed import init_distributed, shutdown
    from llmforge.spec.schema import ParallelismConfig

    init_distributed(ParallelismConfig(), seed=5)
    args.out.write_text(json.dumps({name: _facts(options) for name, options in SHAPES.items()}))
    shutdown()


@pytest.fixture(scope="module")
def facts(tmp_path_factory) -> dict:
    return worker_facts(__file__, tmp_path_factory.mktemp("generate") / "facts.json", timeout=300)


# --- the tests -----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("shape", SHAPES)
def test_cached_decoding_matches_full_recomputation(facts, shape):
    got = facts[shape]
    for case in ("prefill_then_steps", "chunk_after_prefix", "one_token_at_a_time", "left_padded_batch", "logprobs", "logprobs_tempered"):
        assert got[case] < TOLERANCE, (case, got[case])


@pytest.mark.slow
@pytest.mark.parametrize("shape", SHAPES)
def test_a_top_left_causal_mask_would_be_caught(facts, shape):
    assert facts[shape]["top_left_mask_chunk"] > 1e-2


@pytest.mark.slow
@pytest.mark.parametrize("shape", SHAPES)
def test_generation_through_the_cache(facts, shape):
    got = facts[shape]
    assert got["greedy"] == got["greedy_reference"]
    assert got["top_k_1_equals_greedy"]
    assert got["sampling_seeded"] == [True, False]
    assert got["row_alone_equals_in_batch"] and got["batch_size_1_equals_whole"]
    eos = got["eos_token"]
    assert got["eos_stop"][0][-1] == eos and got["eos_stop"][0].count(eos) == 1 and len(got["eos_stop"][0]) <= 3


def test_causal_mask_is_aligned_bottom_right():
    assert causal_mask(2, 4).tolist() == [[True, True, True, False], [True, True, True, True]]
    assert torch.equal(causal_mask(3, 3), torch.ones(3, 3, dtype=torch.bool).tril())


def test_top_k_and_top_p_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[False, False, True, True]]
    # Nucleus 0.7: 0.5 alone is short of it, 0.5 + 0.3 reaches it; the rest go.
    assert torch.isinf(filter_logits(logits, top_p=0.7)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.4)).tolist() == [[False, True, True, True]]
    assert not torch.isinf(filter_logits(logits, top_p=1.0)).any()
    shuffled = logits[:, [2, 0, 3, 1]]
    assert torch.isinf(filter_logits(shuffled, top_p=0.7)).tolist() == [[True, False, True, False]]


def test_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]])).expand(4000, -1)
    draws = sample_next(logits, temperature=1.0, generators=[torch.Generator().manual_seed(i) for i in range(4000)])
    freq = torch.bincount(draws, minlength=3).float() / 4000
    assert torch.allclose(freq, torch.tensor([0.7, 0.2, 0.1]), atol=0.03)
    assert sample_next(logits[:2], temperature=0.0).tolist() == [0, 0]


if __name__ == "__main__":
    main()
