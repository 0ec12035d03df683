"""RL log-probabilities are those of the tempered distribution the rollout was sampled from.

A rollout sampled at temperature 0.7 stores the sampling policy's and the reference's
per-token log-probs, and PolicyGradientStep scores the policy; all three must equal
log_softmax(logits / 0.7) at the sampled ids, computed here with plain torch from the
models' own logits. Runs in a child process (`python test_rl_logprobs.py --out facts.json`)
to keep megatron's global state out of pytest.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from tests.child import worker_facts

TEMPERATURE = 0.7


class _Tokenizer:
    eos_id, pad_id, bos_id, vocab_size = None, 0, None, 16

    def decode(self, ids: list[int]) -> str:
        return " ".join(map(str, ids))


def _facts() -> dict[str, float]:
    import torch

    from llmforge.finetune.rollout import RolloutSource
    from llmforge.runtime.serve import ModelServer
    from llmforge.finetune.steps import PolicyGradientStep
    from llmforge.models.gpt import build_gpt
    from llmforge.runtime.distributed import init_distributed
    from llmforge.runtime.optim import build_adamw, wrap_optimizer
    from llmforge.spec.components import AdamW, GPTModel
    from llmforge.spec.schema import ParallelismConfig

    parallelism = ParallelismConfig()
    ctx = init_distributed(parallelism, seed=1)
    options = GPTModel(num_layers=2, hidden_size=32, num_attention_heads=2, vocab_size=16, seq_length=12, position_embedding_type="rope",
                       normalization="RMSNorm", activation="swiglu", add_bias_linear=False)
    chunks = build_gpt(options, parallelism, precision="fp32", seed=1)
    (reference,) = build_gpt(options, parallelism, precision="fp32", seed=2)  # another model, so its log-probs differ
    optimizer = wrap_optimizer(build_adamw(AdamW(lr=1e-3), model_chunks=chunks), chunks, parallelism)
    step = PolicyGradientStep(chunks, optimizer, parallelism_ctx=ctx, seq_length=8, micro_batch_size=8, precision="fp32", clip_grad=1.0,
                              clip_epsilon=0.2, kl_coef=0.1, updates=2, temperature=TEMPERATURE)
    policy = chunks[0].module
    prompts = [({"prompt": str(i)}, [1, 2 + i]) for i in range(2)]
    source = RolloutSource(prompts, tokenizer=_Tokenizer(), reward=lambda samples: ([0.0] * len(samples), {}),
                           group_size=8, global_batch_size=16, micro_batch_size=8, dp_rank=0, dp_size=1, seed=3, length=8,
                           sampling={"max_new_tokens": 6, "temperature": TEMPERATURE, "top_k": None, "top_p": 1.0},
                           scale_rewards=True, need_old_logprobs=True, reference=ModelServer([reference.eval()]))
    source.bind(ModelServer(chunks), lambda step, stats: None)
    batch = source.next_global_batch()

    def expected(model, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1] - 1).expand(tokens.shape[0], -1)
        with torch.no_grad():
            logits = model.eval()(tokens[:, :-1], positions, None, runtime_gather_output=True).double()
        return torch.log_softmax(logits / temperature, dim=-1).gather(-1, tokens[:, 1:, None]).squeeze(-1)

    worst = {"old": 0.0, "reference": 0.0, "policy_step": 0.0, "raw_vs_tempered": 0.0}
    for tokens, rollout in zip(batch.tokens, batch.masks):
        on = rollout.mask.bool()  # the sampled ids: completion targets
        want = expected(policy, tokens, TEMPERATURE)
        policy.train()
        logp, _ = step._forward_step(iter([(tokens, rollout)]), chunks[0])
        got = {"old": rollout.old_logp, "reference": rollout.reference_logp, "policy_step": logp.detach()}
        for name, value in got.items():
            target = expected(reference, tokens, TEMPERATURE) if name == "reference" else want
            worst[name] = max(worst[name], (value.double() - target)[on].abs().max().item())
        worst["raw_vs_tempered"] = max(worst["raw_vs_tempered"], (expected(policy, tokens, 1.0) - want)[on].abs().max().item())
    worst["completion_tokens"] = float(sum(r.mask.sum() for r in batch.masks))
    torch.distributed.barrier()
    return worst


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    from llmforge.runtime.distributed import shutdown

    args.out.write_text(json.dumps(_facts()))
    shutdown()


@pytest.fixture(scope="module")
def facts(tmp_path_factory) -> dict:
    return worker_facts(__file__, tmp_path_factory.mktemp("rl_logprobs") / "facts.json")


@pytest.mark.slow
@pytest.mark.parametrize("which", ["old", "reference", "policy_step"])
def test_logprobs_are_those_of_the_tempered_sampling_distribution(facts, which):
    assert facts["completion_tokens"] > 0
    assert facts["raw_vs_tempered"] > 1e-2  # temperature 0.7 moves them: the check below can tell the two apart
    assert facts[which] < 1e-6, facts


if __name__ == "__main__":
    main()
