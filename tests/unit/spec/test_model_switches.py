"""The `gpt` model's family switches (kv_channels, rope_scaling_factor, add_qkv_bias, qk_layernorm):
what validate accepts, and each contradiction refused at the key to change."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmforge.spec.components import GPTModel

ROOT = Path(__file__).resolve().parents[3]
TINY = (ROOT / "specs" / "tiny.yaml").read_text()  # rope, RMSNorm, swiglu, no biases, 256 wide with 4 heads


@pytest.mark.parametrize(
    "overrides",
    [
        ["model.kv_channels=96"],  # heads wider than hidden / heads (Qwen3-0.6B's shape)
        ["model.hidden_size=250", "model.kv_channels=64"],  # the width need not divide by the heads then
        ["model.position_embedding_type=learned_absolute", "model.kv_channels=63"],  # no RoPE, odd widths are fine
        ["model.rope_scaling_factor=8", "model.rotary_base=500000.5"],
        ["model.add_qkv_bias=true"],
        ["model.qk_layernorm=true", "model.normalization=LayerNorm"],
    ],
    ids=lambda o: " ".join(o),
)
def test_family_switches_validate(write_spec, cli, overrides):
    code, _, err = cli("validate", write_spec(TINY), *overrides)
    assert code == 0, err


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.kv_channels=63"], "model.kv_channels: kv_channels 63 is odd; RoPE turns pairs of a head's channels"),
        (["model.hidden_size=264", "model.num_attention_heads=8"], "model.num_attention_heads: heads are hidden_size 264 / 8 = 33 wide"),
        (["model.hidden_size=250"], "model.num_attention_heads: hidden_size 250 is not divisible by num_attention_heads 4"),
        (["model.position_embedding_type=learned_absolute", "model.rope_scaling_factor=8"],
         "model.rope_scaling_factor: RoPE scaling needs position_embedding_type rope, not learned_absolute"),
        (["model.rope_scaling_factor=0.5"], "model.rope_scaling_factor: Input should be greater than or equal to 1"),
        (["model.add_bias_linear=true", "model.add_qkv_bias=true"],
         "model.add_qkv_bias: add_bias_linear already puts a bias on the QKV projection"),
    ],
)
def test_contradictions_are_refused_at_the_key(write_spec, cli, overrides, message):
    code, _, err = cli("validate", write_spec(TINY), *overrides)
    assert code == 2
    assert message in err, err


def test_rotary_base_keeps_whole_numbers_and_takes_fractions():
    shape = dict(num_layers=1, hidden_size=64, num_attention_heads=4, vocab_size=256, seq_length=16, position_embedding_type="rope")
    assert GPTModel(**shape).rotary_base == 10000
    assert GPTModel(**shape, rotary_base=500000).rotary_base == 500000.0
    assert GPTModel(**shape, rotary_base=1e6 + 0.5).rotary_base == 1e6 + 0.5


def test_head_dim_is_kv_channels_or_the_even_split():
    shape = dict(num_layers=1, hidden_size=64, num_attention_heads=4, vocab_size=256, seq_length=16)
    assert GPTModel(**shape).head_dim == 16
    assert GPTModel(**shape, kv_channels=24).head_dim == 24
