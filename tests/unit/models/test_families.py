"""The dense HF families as switches of the `gpt` model, checked against `transformers` itself.

For a tiny model of each family (Llama 3 with its RoPE scaling, Mistral v0.3, Qwen2.5 with
a QKV bias, Qwen3 with q/k norms and heads wider than hidden / heads), transformers builds
the reference. The planner's count must equal its parameter count; in one child process
(`python test_families.py --out facts.json`, TP=1) `build_gpt` must allocate that many,
initialize the new tensors, use transformers' rotary frequencies, and, given the HF
weights (norms and biases made non-trivial, so a dropped one shows), give its logits and,
through the KV-cached decoder every llmforge sampler uses, its greedy continuation.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest

from tests.child import worker_facts

from llmforge.models import size
from llmforge.spec.components import GPTModel

VOCAB, SEQ = 256, 16
PROMPT, NEW_TOKENS = [3, 14, 15, 92, 65], 24
# initializer_range 0.2: logits of order 10, so that a misplaced tensor moves them well past the tolerance.
_LLAMA = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, initializer_range=0.2)
_LLAMA3_ROPE = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
_OURS = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=96, vocab_size=VOCAB,
             seq_length=SEQ, max_position_embeddings=64, position_embedding_type="rope", normalization="RMSNorm",
             activation="swiglu", add_bias_linear=False)

# family → (transformers config class, its kwargs, our `model:` options)
FAMILIES: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    "llama3.1": ("LlamaConfig", {**_LLAMA, "rope_theta": 500000.0, "tie_word_embeddings": False, "max_position_embeddings": 131072,
                                 "rope_scaling": {**_LLAMA3_ROPE, "factor": 8.0}},
                 {**_OURS, "rotary_base": 500000, "rope_scaling_factor": 8, "untie_embeddings_and_output_weights": True,
                  "max_position_embeddings": 131072}),
    "llama3.2": ("LlamaConfig", {**_LLAMA, "rope_theta": 500000.0, "tie_word_embeddings": True, "max_position_embeddings": 131072,
                                 "rope_scaling": {**_LLAMA3_ROPE, "factor": 32.0}},
                 {**_OURS, "rotary_base": 500000, "rope_scaling_factor": 32, "max_position_embeddings": 131072}),
    "mistral": ("MistralConfig", {**_LLAMA, "rope_theta": 1e6, "sliding_window": None, "tie_word_embeddings": False},
                {**_OURS, "rotary_base": 1e6, "untie_embeddings_and_output_weights": True}),
    "qwen2.5": ("Qwen2Config", {**_LLAMA, "rope_theta": 1e6, "rms_norm_eps": 1e-6, "tie_word_embeddings": True},
                {**_OURS, "rotary_base": 1e6, "norm_epsilon": 1e-6, "add_qkv_bias": True}),
    "qwen3": ("Qwen3Config", {**_LLAMA, "rope_theta": 1e6, "rms_norm_eps": 1e-6, "head_dim": 24, "tie_word_embeddings": False},
              {**_OURS, "rotary_base": 1e6, "norm_epsilon": 1e-6, "qk_layernorm": True, "kv_channels": 24,
               "untie_embeddings_and_output_weights": True}),
}


def hf_model(family: str):
    """transformers' tiny model of the family, fp32, with random norm weights and biases."""
    import torch
    import transformers

    cls, kwargs, _ = FAMILIES[family]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(getattr(transformers, cls)(**kwargs), attn_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:  # norms and biases: at ones and zeros a dropped one would not show
                p.copy_(torch.empty_like(p).uniform_(0.5, 1.5) if "norm" in name else torch.randn_like(p) * 0.1)
    return model.eval()


def _fused_qkv(q, k, v, groups: int):
    """HF's separate q/k/v rows → megatron's fused rows, grouped per query group: [q of group g; k_g; v_g]."""
    import torch

    def per_group(t):
        return t.reshape(groups, -1, *t.shape[1:])

    return torch.cat([per_group(q), per_group(k), per_group(v)], dim=1).reshape(-1, *q.shape[1:])


def megatron_state(hf, options: GPTModel) -> dict:
    """The HF weights under megatron's names and layouts (TP=1)."""
    import torch

    sd, out, groups = hf.state_dict(), {}, options.kv_groups
    out["embedding.word_embeddings.weight"] = sd["model.embed_tokens.weight"]
    out["decoder.final_layernorm.weight"] = sd["model.norm.weight"]
    if options.untie_embeddings_and_output_weights:
        out["output_layer.weight"] = sd["lm_head.weight"]
    for i in range(options.num_layers):
        h, m = f"model.layers.{i}.", f"decoder.layers.{i}."
        a = h + "self_attn."
        out[m + "input_layernorm.weight"] = sd[h + "input_layernorm.weight"]
        out[m + "pre_mlp_layernorm.weight"] = sd[h + "post_attention_layernorm.weight"]
        for kind in ("weight", "bias"):
            if a + f"q_proj.{kind}" in sd:
                out[m + f"self_attention.linear_qkv.{kind}"] = _fused_qkv(*(sd[a + f"{p}_proj.{kind}"] for p in "qkv"), groups)
        out[m + "self_attention.linear_proj.weight"] = sd[a + "o_proj.weight"]
        for ours, theirs in (("q_layernorm", "q_norm"), ("k_layernorm", "k_norm")):
            if a + f"{theirs}.weight" in sd:
                out[m + f"self_attention.{ours}.weight"] = sd[a + f"{theirs}.weight"]
        out[m + "mlp.linear_fc1.weight"] = torch.cat([sd[h + "mlp.gate_proj.weight"], sd[h + "mlp.up_proj.weight"]])
        out[m + "mlp.linear_fc2.weight"] = sd[h + "mlp.down_proj.weight"]
    return out


def _family_facts(family: str) -> dict:
    import torch

    from llmforge.models.gpt import build_gpt
    from llmforge.spec.schema import ParallelismConfig

    options = GPTModel(**FAMILIES[family][2])
    (model,) = build_gpt(options, ParallelismConfig(), precision="fp32", seed=3)
    params = dict(model.named_parameters())
    new = {n: p for n, p in params.items() if "q_layernorm" in n or "k_layernorm" in n or n.endswith("linear_qkv.bias")}
    facts = {
        "numel": sum(p.numel() for p in params.values()),
        "shapes": {n: list(p.shape) for n, p in new.items()},
        "initialized": all(bool((p == (1.0 if "layernorm" in n else 0.0)).all()) for n, p in new.items()),
        "checkpointed": sorted(k for k in model.sharded_state_dict() if "q_layernorm" in k or "k_layernorm" in k),
        "inv_freq": model.rotary_pos_emb.inv_freq.tolist(),
    }
    hf = hf_model(family)
    state = megatron_state(hf, options)
    missing = set(params) - set(state)
    assert not missing, f"no HF tensor for {sorted(missing)}"
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)
        ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1))
        ours = model(ids, torch.arange(SEQ).expand(2, -1), None)
        theirs = hf(ids).logits
    facts["max_logit_diff"] = (ours - theirs).abs().max().item()
    facts["logit_scale"] = theirs.abs().max().item()
    # The KV-cached decoder (runtime/generate.py) against transformers' own greedy search.
    from llmforge.runtime.serve import ModelServer

    facts["greedy"] = ModelServer([model]).generate([PROMPT], max_new_tokens=NEW_TOKENS)[0]
    hf.generation_config.eos_token_id = None  # Llama's default EOS id 2 is an ordinary token to ours: never stop early
    out = hf.generate(torch.tensor([PROMPT]), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    facts["greedy_transformers"] = out[0, len(PROMPT):].tolist()
    return facts


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    from llmforge.runtime.distributed import init_distributed, shutdown
    from llmforge.spec.schema import ParallelismConfig

    init_distributed(ParallelismConfig(), seed=3)
    args.out.write_text(json.dumps({family: _family_facts(family) for family in FAMILIES}))
    shutdown()


@pytest.fixture(scope="module")
def facts(tmp_path_factory) -> dict:
    return worker_facts(__file__, tmp_path_factory.mktemp("families") / "facts.json", timeout=300)


@pytest.mark.parametrize("family", FAMILIES)
def test_planned_parameters_equal_transformers_count(family):
    reference = sum(p.numel() for p in hf_model(family).parameters())
    assert size.param_count(GPTModel(**FAMILIES[family][2])) == reference


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_built_model_has_the_planned_parameters(facts, family):
    assert facts[family]["numel"] == size.param_count(GPTModel(**FAMILIES[family][2]))


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_equal_transformers_given_its_weights(facts, family):
    got = facts[family]
    assert got["logit_scale"] > 1  # large enough that a dropped norm or bias moves them by far more than 1e-4
    assert got["max_logit_diff"] < 1e-4, got


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_kv_cached_greedy_generation_equals_transformers(facts, family):
    got = facts[family]
    assert len(got["greedy"]) == NEW_TOKENS and got["greedy"] == got["greedy_transformers"]


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_rotary_frequencies_equal_transformers(facts, family):
    import torch
    import transformers

    hf = hf_model(family)
    reference = hf.model.rotary_emb.inv_freq
    assert torch.allclose(torch.tensor(facts[family]["inv_freq"]), reference, rtol=1e-6, atol=0)
    if FAMILIES[family][2].get("rope_scaling_factor"):  # scaling really changed them
        plain = getattr(transformers, FAMILIES[family][0])(**{**FAMILIES[family][1], "rope_scaling": None})
        assert not torch.allclose(type(hf.model.rotary_emb)(plain).inv_freq, reference)


@pytest.mark.slow
def test_new_tensors_start_at_megatron_init_and_are_checkpointed(facts):
    qwen3, qwen2 = facts["qwen3"], facts["qwen2.5"]
    assert qwen3["shapes"]["decoder.layers.0.self_attention.q_layernorm.weight"] == [24]
    assert qwen3["shapes"]["decoder.layers.1.self_attention.k_layernorm.weight"] == [24]
    assert qwen2["shapes"]["decoder.layers.0.self_attention.linear_qkv.bias"] == [(4 + 2 * 2) * 16]
    assert qwen3["initialized"] and qwen2["initialized"]
    assert len(qwen3["checkpointed"]) == 4 and all(k.endswith(".weight") for k in qwen3["checkpointed"])


if __name__ == "__main__":
    main()
