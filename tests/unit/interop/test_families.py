"""The family modules without building a model: each reads the config transformers writes for it,
writes one transformers reads back as equal, maps transformers' own tensor names and shapes
exactly, and export picks a family from the model's shape alone (Mistral only from a record)."""

from __future__ import annotations

import pytest
import torch

from llmforge.interop.families import FAMILIES, family_of_config, family_of_model
from llmforge.interop.hf_config import from_hf_config, validated_model
from llmforge.interop.hf_mapping import from_hf, to_hf
from llmforge.spec.errors import UserError

from .families_tiny import SPECS

transformers = pytest.importorskip("transformers")
FAMILY_NAMES = ("llama", "mistral", "qwen2", "qwen3")


def _transformers_config(family: str, **changes):
    class_name, options = SPECS[family]["config"]
    return getattr(transformers, class_name)(**{**options, **changes})


@pytest.mark.parametrize(("family", "expected"), [
    ("llama", {"rotary_base": 500000.0, "rope_scaling_factor": 32.0, "untie_embeddings_and_output_weights": False, "kv_channels": None,
               "add_bias_linear": False, "add_qkv_bias": False, "qk_layernorm": False}),
    ("mistral", {"rotary_base": 1000000.0, "rope_scaling_factor": None, "untie_embeddings_and_output_weights": True}),
    ("qwen2", {"add_qkv_bias": True, "add_bias_linear": False, "max_position_embeddings": 32768}),
    ("qwen3", {"qk_layernorm": True, "kv_channels": 32, "add_bias_linear": False, "norm_epsilon": 1e-6}),
])
def test_a_transformers_config_is_read_as_its_family(family, expected):
    name, options = from_hf_config(_transformers_config(family).to_dict(), "config.json")
    model = validated_model(options, "config.json")
    assert name == family
    assert {k: getattr(model, k) for k in expected} == expected


def test_llama3_rope_reads_the_same_in_the_transformers_4_spelling():
    config = _transformers_config("llama").to_dict()
    rope = dict(config["rope_parameters"])
    v4 = {k: v for k, v in config.items() if k != "rope_parameters"} | {"rope_theta": rope.pop("rope_theta"), "rope_scaling": rope}
    assert from_hf_config(v4, "c.json") == from_hf_config(config, "c.json")
    bad = {**v4, "rope_scaling": {**rope, "original_max_position_embeddings": 131072}}
    with pytest.raises(UserError, match=r"rope_scaling\.original_max_position_embeddings 131072 \(megatron-core 0\.16 fixes it at 8192"):
        from_hf_config(bad, "c.json")


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_the_config_written_loads_in_transformers_as_the_same_model(family):
    cls = FAMILIES[family]
    _, options = from_hf_config(_transformers_config(family).to_dict(), "config.json")
    model = validated_model(options, "config.json")
    written = {"architectures": [cls.hf_class], "model_type": cls.model_types[0], **cls.to_config(model)}
    loaded = transformers.AutoConfig.for_model(**written)
    assert type(loaded).__name__ == SPECS[family]["config"][0]
    assert family_of_config(loaded.to_dict(), "c.json") is cls
    assert validated_model({"name": "gpt", **cls.from_config(loaded.to_dict(), "c.json")}, "c.json") == model


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_links_map_transformers_own_tensors_exactly(family):
    config = _transformers_config(family, num_hidden_layers=1)
    hf = transformers.AutoModelForCausalLM.from_config(config)
    _, options = from_hf_config(config.to_dict(), "config.json")
    model = validated_model(options, "config.json")
    theirs = {n: t for n, t in hf.state_dict().items() if n != "lm_head.weight" or model.untie_embeddings_and_output_weights}
    state = from_hf(theirs, model, source="hf", family=FAMILIES[family])
    ours = to_hf(state, model, source="ckpt")
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[n], theirs[n]) for n in theirs)


def test_export_picks_the_family_from_the_shape():
    picked = {}
    for family in FAMILY_NAMES:
        _, options = from_hf_config(_transformers_config(family).to_dict(), "config.json")
        picked[family] = family_of_model(validated_model(options, "config.json")).name
    # Mistral computes what Llama computes: only an import record makes an export Mistral.
    assert picked == {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}


def test_an_unknown_family_is_named_with_the_supported_ones():
    with pytest.raises(UserError, match="model_type 'gemma' is not supported") as info:
        family_of_config({"model_type": "gemma"}, "config.json")
    assert "qwen3 (Qwen3ForCausalLM)" in str(info.value) and "mistral (MistralForCausalLM)" in str(info.value)
    assert family_of_config({"architectures": ["Qwen2ForCausalLM"]}, "c.json") is FAMILIES["qwen2"]  # no model_type: the class
