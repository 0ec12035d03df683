"""config.json ↔ model options: both architectures, both transformers key spellings, and the
refusals that name the field which does not fit."""

from __future__ import annotations

import subprocess
import sys

import pytest

from llmforge.interop.hf_config import architecture_of, from_hf_config, to_hf_config, validated_model
from llmforge.models.presets import shrink
from llmforge.spec.components import GPTModel
from llmforge.spec.errors import UserError


def _model(preset: str, **overrides) -> GPTModel:
    return GPTModel.model_validate(shrink(preset, **overrides))


def test_llama_shape_round_trips_through_config_json():
    model = _model("llama2-7b", num_query_groups=2, rotary_base=500000, norm_epsilon=1e-6)
    config = to_hf_config(model, token_ids={"bos": 1, "eos": 2, "pad": None}, dtype="float32")
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["num_key_value_heads"] == 2 and config["head_dim"] == 16
    # Both spellings, so that transformers 4.x and 5.x read the same RoPE base.
    assert config["rope_theta"] == 500000.0 and config["rope_parameters"]["rope_theta"] == 500000.0
    arch, options = from_hf_config(config, "config.json")
    assert arch == "llama"
    assert validated_model(options, "config.json") == model.model_copy(update={"max_position_embeddings": model.max_positions})


def test_gpt2_shape_round_trips_through_config_json():
    model = _model("gpt2-124m", hidden_dropout=0.1, attention_dropout=0.05)
    config = to_hf_config(model, token_ids={"eos": 5}, dtype="bfloat16")
    assert config["architectures"] == ["GPT2LMHeadModel"]
    assert config["activation_function"] == "gelu_new" and config["tie_word_embeddings"] is True
    assert config["torch_dtype"] == config["dtype"] == "bfloat16"
    arch, options = from_hf_config(config, "config.json")
    assert arch == "gpt2" and options["name"] == "gpt"
    assert validated_model(options, "config.json") == model.model_copy(update={"max_position_embeddings": model.max_positions})


def test_transformers_configs_are_read_as_written(tmp_path):
    transformers = pytest.importorskip("transformers")
    llama = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=1,
                                     intermediate_size=96, vocab_size=300, max_position_embeddings=48, rope_theta=20000.0)
    arch, options = from_hf_config(llama.to_dict(), "config.json")
    assert (arch, options["num_query_groups"], options["rotary_base"], options["ffn_hidden_size"]) == ("llama", 1, 20000, 96)
    assert options["untie_embeddings_and_output_weights"] is True
    gpt2 = transformers.GPT2Config(n_layer=3, n_embd=32, n_head=2, vocab_size=100, n_positions=16)
    arch, options = from_hf_config(gpt2.to_dict(), "config.json")
    assert (arch, options["num_layers"], options["ffn_hidden_size"], options["activation"]) == ("gpt2", 3, 128, "gelu_tanh")


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"position_embedding_type": "rope", "normalization": "LayerNorm", "activation": "gelu"}, "normalization LayerNorm"),
        ({"add_bias_linear": False}, "add_bias_linear False"),
        ({"num_query_groups": 2}, "num_query_groups 2"),
    ],
)
def test_shapes_no_hf_architecture_computes_are_refused_by_field(overrides, named):
    with pytest.raises(UserError, match=named):
        architecture_of(_model("gpt2-124m", **overrides))


@pytest.mark.parametrize(
    ("config", "named"),
    [
        ({"model_type": "gemma", "architectures": ["GemmaForCausalLM"]}, "model_type 'gemma'"),
        ({"model_type": "llama", "hidden_size": 64}, "missing vocab_size"),
        ({"model_type": "llama", "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 2.0, "high_freq_factor": 4.0,
                                                  "original_max_position_embeddings": 8192}}, "rope_scaling.low_freq_factor 2.0"),
        ({"model_type": "llama", "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, "rope_parameters.rope_type 'yarn'"),
        ({"model_type": "llama", "hidden_act": "gelu"}, "hidden_act 'gelu'"),
        ({"model_type": "llama", "attention_bias": True}, "attention_bias and mlp_bias differ"),
        ({"model_type": "gpt2", "activation_function": "relu"}, "activation_function 'relu'"),
        ({"model_type": "gpt2", "scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
    ],
)
def test_unsupported_configs_name_the_field(config, named):
    base = {"llama": {"vocab_size": 64, "hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4, "intermediate_size": 96},
            "gpt2": {"vocab_size": 64, "n_embd": 64, "n_layer": 1, "n_head": 4}}.get(config["model_type"], {})
    full = {**base, **config} if "missing" not in named else config
    with pytest.raises(UserError, match=named) as info:
        from_hf_config(full, "hf/config.json")
    assert "hf/config.json" in str(info.value)


def test_a_config_breaking_our_shape_rules_is_named():
    arch, options = from_hf_config({"model_type": "gpt2", "vocab_size": 64, "n_embd": 64, "n_layer": 1, "n_head": 5}, "c.json")
    with pytest.raises(UserError, match="c.json.*num_attention_heads"):
        validated_model(options, "c.json")


def test_config_module_does_not_import_torch():
    code = "import sys, llmforge.interop.hf_config; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
