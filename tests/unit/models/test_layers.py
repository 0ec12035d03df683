"""SDPA core attention and the SP-capable torch norms, against plain definitions."""

from __future__ import annotations

import math
import subprocess
import sys
import warnings

import pytest
import torch

pytest.importorskip("megatron.core")

from megatron.core.transformer.enums import AttnMaskType  # noqa: E402
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402

from llmforge.models.layers import SDPACoreAttention, TorchNorm  # noqa: E402


def _config(**kwargs) -> TransformerConfig:
    kwargs.setdefault("attention_dropout", 0.0)
    return TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4, num_query_groups=kwargs.pop("groups", 4), **kwargs)


def _reference(q, k, v, keep):
    """Attention written out: [s, b, heads, dim] in, [s, b, heads * dim] out."""
    heads, groups = q.shape[2], k.shape[2]
    k, v = (t.repeat_interleave(heads // groups, dim=2) for t in (k, v))
    scores = torch.einsum("sbhd,tbhd->bhst", q, k) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~keep, float("-inf"))
    out = torch.einsum("bhst,tbhd->sbhd", scores.softmax(-1), v)
    return out.reshape(q.shape[0], q.shape[1], -1)


def _qkv(s=6, b=2, heads=4, groups=4, dim=8):
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(s, b, heads, dim, generator=generator)
    return q, torch.randn(s, b, groups, dim, generator=generator), torch.randn(s, b, groups, dim, generator=generator)


@pytest.mark.parametrize("groups", [4, 2, 1])
def test_causal_attention_with_query_groups(groups):
    attention = SDPACoreAttention(_config(groups=groups), 1, AttnMaskType.causal, "self")
    q, k, v = _qkv(groups=groups)
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    torch.testing.assert_close(attention(q, k, v, None), _reference(q, k, v, causal))


def test_padding_mask_and_padding_causal_follow_megatrons_convention():
    q, k, v = _qkv()
    masked_out = torch.zeros(2, 1, 6, 6, dtype=torch.bool)
    masked_out[1, ..., 4:] = True  # sample 1: the last two keys are padding (True = masked)
    padding = SDPACoreAttention(_config(), 1, AttnMaskType.padding, "self")
    torch.testing.assert_close(padding(q, k, v, masked_out), _reference(q, k, v, ~masked_out))
    both = SDPACoreAttention(_config(), 1, AttnMaskType.padding_causal, "self")
    torch.testing.assert_close(both(q, k, v, masked_out), _reference(q, k, v, ~masked_out & torch.ones(6, 6, dtype=torch.bool).tril()))


def test_attention_dropout_is_off_in_eval():
    attention = SDPACoreAttention(_config(attention_dropout=0.5), 1, AttnMaskType.causal, "self")
    q, k, v = _qkv()
    attention.eval()
    torch.testing.assert_close(attention(q, k, v, None), _reference(q, k, v, torch.ones(6, 6, dtype=torch.bool).tril()))


@pytest.mark.parametrize("normalization, kind", [("LayerNorm", torch.nn.LayerNorm), ("RMSNorm", torch.nn.RMSNorm)])
def test_norms_take_type_and_epsilon_and_carry_the_sp_tag(normalization, kind):
    norm = TorchNorm(_config(normalization=normalization, tensor_model_parallel_size=2, sequence_parallel=True), 32, eps=1e-6)
    assert isinstance(norm, kind) and norm.eps == 1e-6
    assert all(p.sequence_parallel for p in norm.parameters())


@pytest.mark.parametrize("normalization", ["LayerNorm", "RMSNorm"])
def test_norms_under_bf16_autocast_over_fp32_weights_warn_nothing(normalization):
    norm = TorchNorm(_config(normalization=normalization), 32)
    torch.nn.init.uniform_(norm.weight, 0.5, 1.5)
    x = torch.randn(6, 2, 32, generator=torch.Generator().manual_seed(0)).bfloat16()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's "Mismatch dtype between input and weight" fails the test
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = norm(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, norm(x.float()).bfloat16(), rtol=0, atol=0)  # computed in fp32


def test_presets_are_valid_gpt_options_and_torch_free():
    from llmforge.models.presets import PRESETS, shrink
    from llmforge.spec.components import GPTModel

    switches = ("position_embedding_type", "normalization", "norm_epsilon", "activation", "add_bias_linear", "untie_embeddings_and_output_weights")
    for name in PRESETS:
        full, small = GPTModel(**PRESETS[name]), GPTModel(**shrink(name))
        assert [getattr(small, key) for key in switches] == [getattr(full, key) for key in switches]
        assert small.hidden_size == 64
    gpt2 = GPTModel(**PRESETS["gpt2-124m"])
    assert (gpt2.num_layers, gpt2.hidden_size, gpt2.activation, gpt2.untie_embeddings_and_output_weights) == (12, 768, "gelu_tanh", False)
    llama = GPTModel(**PRESETS["llama2-7b"])
    assert (llama.num_layers, llama.ffn, llama.activation, llama.position_embedding_type, llama.add_bias_linear) == (32, 11008, "swiglu", "rope", False)
    probe = "import sys, llmforge.models.presets; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe]).returncode == 0
