"""Tensor names and layouts between megatron and HF, checked without building either model."""

from __future__ import annotations

import pytest
import torch

from llmforge.interop.hf_mapping import dims, canonical_megatron, from_hf, fuse_qkv, links, split_qkv, to_hf
from llmforge.models.presets import shrink
from llmforge.spec.components import GPTModel
from llmforge.spec.errors import UserError

LLAMA = GPTModel.model_validate(shrink("llama2-7b", num_query_groups=2, ffn_hidden_size=96))
GPT2 = GPTModel.model_validate(shrink("gpt2-124m"))


def _random_megatron(model: GPTModel, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {link.megatron: torch.randn(link.megatron_shape, generator=g) for link in links(model)}


def test_qkv_layout_is_per_query_group():
    """Rows of megatron's fused QKV: for each group, its query heads, then its key, then its value."""
    d = dims(LLAMA)  # 4 heads, 2 groups, head_dim 16
    q = torch.arange(4).repeat_interleave(16).float() + 100  # query head j: 100 + j
    k = torch.arange(2).repeat_interleave(16).float() + 200
    v = torch.arange(2).repeat_interleave(16).float() + 300
    fused = fuse_qkv(q, k, v, d)
    heads_in_order = fused.reshape(-1, 16)[:, 0].tolist()
    assert heads_in_order == [100, 101, 200, 300, 102, 103, 201, 301]
    assert all(torch.equal(a, b) for a, b in zip(split_qkv(fused, d), (q, k, v), strict=True))


@pytest.mark.parametrize("model", [LLAMA, GPT2], ids=["llama", "gpt2"])
def test_megatron_to_hf_and_back_is_exact(model):
    state = _random_megatron(model)
    hf = to_hf(state, model, source="ckpt")
    back = from_hf(hf, model, source="hf")
    assert back.keys() == state.keys()
    assert all(torch.equal(back[n], state[n]) for n in state)


def test_hf_names_and_layouts_match_transformers():
    transformers = pytest.importorskip("transformers")
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
        vocab_size=256, max_position_embeddings=32))
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=256, n_positions=32))
    for model, hf in ((LLAMA, llama), (GPT2, gpt2)):
        theirs = {n: t for n, t in hf.state_dict().items() if n != "lm_head.weight" or model.untie_embeddings_and_output_weights}
        ours = to_hf(from_hf(theirs, model, source="hf"), model, source="ckpt")
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[n], theirs[n]) for n in theirs)


def test_gpt2_conv1d_is_transposed_and_c_attn_is_q_k_v():
    state = _random_megatron(GPT2)
    hf = to_hf(state, GPT2, source="ckpt")
    fc1 = state["decoder.layers.0.mlp.linear_fc1.weight"]
    assert torch.equal(hf["transformer.h.0.mlp.c_fc.weight"], fc1.t())
    qkv = state["decoder.layers.1.self_attention.linear_qkv.weight"]  # per head: [q, k, v] rows of 16
    c_attn = hf["transformer.h.1.attn.c_attn.weight"].t()  # [Q; K; V]
    head2_key = qkv[2 * 48 + 16 : 2 * 48 + 32]
    assert torch.equal(c_attn[64 + 32 : 64 + 48], head2_key)


def test_swiglu_fc1_is_gate_then_up():
    state = _random_megatron(LLAMA)
    hf = to_hf(state, LLAMA, source="ckpt")
    fc1 = state["decoder.layers.1.mlp.linear_fc1.weight"]
    assert torch.equal(hf["model.layers.1.mlp.gate_proj.weight"], fc1[:96])
    assert torch.equal(hf["model.layers.1.mlp.up_proj.weight"], fc1[96:])


def test_missing_unexpected_and_misshapen_tensors_are_named():
    hf = to_hf(_random_megatron(LLAMA), LLAMA, source="ckpt")
    broken = dict(hf)
    del broken["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(UserError, match=r"hf-dir: missing tensor: model\.layers\.1\.mlp\.up_proj\.weight"):
        from_hf(broken, LLAMA, source="hf-dir")
    broken = {**hf, "model.layers.2.input_layernorm.weight": torch.ones(64)}
    with pytest.raises(UserError, match=r"unexpected tensor: model\.layers\.2\.input_layernorm\.weight"):
        from_hf(broken, LLAMA, source="hf-dir")
    broken = {**hf, "model.layers.0.self_attn.k_proj.weight": torch.ones(64, 64)}
    with pytest.raises(UserError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight has shape \(64, 64\), config\.json implies \(32, 64\)"):
        from_hf(broken, LLAMA, source="hf-dir")
    state = _random_megatron(LLAMA)
    state["decoder.final_layernorm.weight"] = torch.ones(65)
    with pytest.raises(UserError, match=r"decoder\.final_layernorm\.weight has shape \(65,\)"):
        to_hf(state, LLAMA, source="ckpt")


def test_old_gpt2_files_and_buffers_are_accepted():
    """Files from the original GPT-2 release have no `transformer.` prefix and carry mask buffers."""
    hf = to_hf(_random_megatron(GPT2), GPT2, source="ckpt")
    old = {n.removeprefix("transformer."): t for n, t in hf.items()}
    old["h.0.attn.bias"] = torch.ones(1, 1, 32, 32)
    old["lm_head.weight"] = hf["transformer.wte.weight"]  # tied: transformers ignores it
    back = from_hf(old, GPT2, source="hf")
    assert torch.equal(back["decoder.layers.1.mlp.linear_fc2.weight"], hf["transformer.h.1.mlp.c_proj.weight"].t())


def test_transformer_engine_names_map_to_the_local_spec():
    state = {"decoder.layers.0.self_attention.linear_qkv.layer_norm_weight": torch.ones(2),
             "decoder.layers.0.mlp.linear_fc1.layer_norm_bias": torch.zeros(2),
             "decoder.layers.0.mlp.linear_fc1._extra_state": None}
    assert set(canonical_megatron(state)) == {"decoder.layers.0.input_layernorm.weight", "decoder.layers.0.pre_mlp_layernorm.bias"}
