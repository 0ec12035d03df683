"""Parity, verified by transformers itself: export → HF logits equal llmforge's; an HF model
transformers made → import → llmforge logits equal HF's; import → export is byte-exact."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from llmforge.interop.export import export_hf
from llmforge.interop.hf_files import read_hf_weights
from llmforge.interop.import_ import import_hf
from llmforge.runtime.checkpoint import verify

from .tiny import MODELS, SEQ, build, byte_tokenizer, forward, hf_model, random_ids, save_hf, write_run

transformers = pytest.importorskip("transformers")
ATOL = 1e-4


def _load_imported(out):
    """llmforge's model for an import: built from the written model.yaml, loaded from its checkpoint."""
    from llmforge.interop.export import model_options
    from llmforge.interop.model_io import single_process_model
    from llmforge.runtime.sharded_io import load_sharded

    module = single_process_model(model_options(out))
    load_sharded(out / "checkpoints" / "import" / "step-0" / "model", [module], None)
    return module


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_exported_model_gives_llmforge_logits_in_transformers(tmp_path, arch, hf_logits):
    module = build(MODELS[arch])
    write_run(tmp_path / "run", MODELS[arch], module)
    done = export_hf(tmp_path / "run", tmp_path / "hf")
    out = tmp_path / "hf"
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [{"llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel"}[arch]]
    assert done["weight_files"] == ["model.safetensors"]
    ids = random_ids()
    ours, theirs = forward(module, ids), hf_logits(out, ids)
    assert ours.shape == theirs.shape == (2, SEQ, MODELS[arch]["vocab_size"])
    torch.testing.assert_close(theirs, ours, atol=ATOL, rtol=0)
    # The tokenizer and generation settings come along, and transformers reads them.
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    text = "Parity <|eos|> héllo"
    assert tokenizer(text)["input_ids"] == byte_tokenizer().encode(text)
    assert tokenizer.eos_token == "<|eos|>" and config["eos_token_id"] == tokenizer.eos_token_id
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == byte_tokenizer().eos_id


def test_sharded_export_with_index_loads_in_transformers(tmp_path, hf_logits):
    module = build(MODELS["llama"])
    step_dir = write_run(tmp_path / "run", MODELS["llama"], module)
    done = export_hf(step_dir, tmp_path / "hf", max_shard_size="100KB", dtype="float32")
    assert len(done["weight_files"]) > 2 and done["weight_files"][-1] == "model.safetensors.index.json"
    ids = random_ids(seed=1)
    torch.testing.assert_close(hf_logits(tmp_path / "hf", ids), forward(module, ids), atol=ATOL, rtol=0)


@pytest.mark.parametrize(("arch", "tied"), [("llama", False), ("llama", True), ("gpt2", True), ("gpt2", False)])
def test_imported_transformers_model_gives_hf_logits_in_llmforge(tmp_path, arch, tied, hf_logits):
    bias = {"attention_bias": True, "mlp_bias": True} if arch == "llama" and tied else {}
    hf = hf_model(arch, tied=tied, **bias)
    save_hf(hf, tmp_path / "hf")
    done = import_hf(tmp_path / "hf", tmp_path / "out")
    out = tmp_path / "out"
    verify(out / "checkpoints" / "import" / "step-0")
    assert done["checkpoint"] == str(out.absolute() / "checkpoints" / "import" / "step-0")
    ids = random_ids(seed=2)
    torch.testing.assert_close(forward(_load_imported(out), ids), hf_logits(hf, ids), atol=ATOL, rtol=0)


@pytest.mark.parametrize(("arch", "dtype"), [("llama", torch.float32), ("gpt2", torch.float32), ("llama", torch.bfloat16)])
def test_import_then_export_is_byte_for_byte(tmp_path, arch, dtype):
    save_hf(hf_model(arch, dtype=dtype), tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "out")
    export_hf(tmp_path / "out", tmp_path / "back", dtype=str(dtype).removeprefix("torch."))
    original, back = read_hf_weights(tmp_path / "hf"), read_hf_weights(tmp_path / "back")
    assert original.keys() == back.keys()
    for name, tensor in original.items():
        assert back[name].dtype == tensor.dtype and back[name].shape == tensor.shape, name
        assert back[name].view(torch.uint8).numpy().tobytes() == tensor.view(torch.uint8).numpy().tobytes(), name
    # The tokenizer files travel unchanged, too.
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "back" / name).read_bytes() == (tmp_path / "hf" / name).read_bytes()


def test_import_fragment_is_a_valid_spec_base_and_init_from(tmp_path):
    from llmforge.spec.validate import load_and_validate

    save_hf(hf_model("gpt2"), tmp_path / "hf")
    done = import_hf(tmp_path / "hf", tmp_path / "out")
    fragment = yaml.safe_load((tmp_path / "out" / "model.yaml").read_text())
    assert fragment["tokenizer"] == {"name": "pretrained", "path": str((tmp_path / "out" / "tokenizer").absolute())}
    spec = tmp_path / "finetune.yaml"
    spec.write_text(
        "extends: out/model.yaml\n"
        "name: ft\n"
        "data: {sources: {add: {name: tasks, format: text}}}\n"
        "stages:\n"
        "  - {name: prepare, type: prepare}\n"
        f"  - name: train\n    type: pretrain\n    init_from: {done['checkpoint']}\n"
        "    train: {micro_batch_size: 1, global_batch_size: 1, max_steps: 1}\n"
    )
    parsed, _ = load_and_validate(str(spec), [], check_inputs=True)
    assert parsed.model.num_layers == 2 and parsed.stages[1].init_from == done["checkpoint"]


def test_export_picks_the_last_stage_with_a_checkpoint_or_the_one_named(tmp_path, hf_logits):
    first, second = build(MODELS["gpt2"], seed=1), build(MODELS["gpt2"], seed=2)
    write_run(tmp_path / "run", MODELS["gpt2"], first, stage="pretrain")
    spec = yaml.safe_load((tmp_path / "run" / "spec.resolved.yaml").read_text())
    write_run(tmp_path / "run", MODELS["gpt2"], second, stage="sft")
    spec["stages"].append({"name": "sft", "type": "sft"})
    (tmp_path / "run" / "spec.resolved.yaml").write_text(yaml.safe_dump(spec))
    ids = random_ids(seed=3)
    assert not torch.allclose(forward(first, ids), forward(second, ids), atol=1e-2)
    assert export_hf(tmp_path / "run", tmp_path / "last")["checkpoint"].endswith("sft/step-3")
    torch.testing.assert_close(hf_logits(tmp_path / "last", ids), forward(second, ids), atol=ATOL, rtol=0)
    export_hf(tmp_path / "run", tmp_path / "named", stage="pretrain")
    torch.testing.assert_close(hf_logits(tmp_path / "named", ids), forward(first, ids), atol=ATOL, rtol=0)
