"""`llmforge export hf` / `llmforge import hf` on bad input: exit 2, the tensor or field named,
and nothing left in OUT."""

from __future__ import annotations

import json

import pytest
import yaml

from llmforge.cli import main

from .tiny import MODELS, build, hf_model, save_hf, write_run

pytest.importorskip("transformers")


def _fails(capsys, argv: list[str], *needles: str) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err
    return err


def _nothing_left(out) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


@pytest.fixture
def hf_dir(tmp_path):
    return save_hf(hf_model("llama"), tmp_path / "hf")


def test_import_and_export_succeed_through_the_cli(tmp_path, hf_dir, capsys):
    assert main(["import", "hf", str(hf_dir), str(tmp_path / "out")]) == 0
    assert "init_from: " + str(tmp_path / "out" / "checkpoints" / "import" / "step-0") in capsys.readouterr().out
    assert main(["export", "hf", str(tmp_path / "out"), str(tmp_path / "back"), "--dtype", "bfloat16"]) == 0
    assert "LlamaForCausalLM" in capsys.readouterr().out
    assert json.loads((tmp_path / "back" / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_import_names_a_mismatched_shape(tmp_path, hf_dir, capsys):
    config = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**config, "intermediate_size": 128}))
    _fails(capsys, ["import", "hf", str(hf_dir), str(tmp_path / "out")],
           "model.layers.0.mlp.gate_proj.weight has shape (96, 64), config.json implies (128, 64)")
    _nothing_left(tmp_path / "out")


def test_import_names_a_missing_tensor(tmp_path, hf_dir, capsys):
    from safetensors.torch import load_file, save_file

    tensors = load_file(hf_dir / "model.safetensors")
    del tensors["model.layers.1.self_attn.v_proj.weight"]
    save_file(tensors, hf_dir / "model.safetensors", metadata={"format": "pt"})
    _fails(capsys, ["import", "hf", str(hf_dir), str(tmp_path / "out")], "missing tensor: model.layers.1.self_attn.v_proj.weight")
    _nothing_left(tmp_path / "out")


def test_import_refuses_an_unsupported_architecture(tmp_path, hf_dir, capsys):
    config = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**config, "model_type": "gemma", "architectures": ["GemmaForCausalLM"]}))
    _fails(capsys, ["import", "hf", str(hf_dir), str(tmp_path / "out")], "model_type 'gemma' is not supported")
    _nothing_left(tmp_path / "out")


def test_import_refuses_a_tokenizer_larger_than_the_vocabulary(tmp_path, capsys):
    hf_dir = save_hf(hf_model("gpt2", vocab_size=256), tmp_path / "hf")  # the byte tokenizer has 262 tokens
    _fails(capsys, ["import", "hf", str(hf_dir), str(tmp_path / "out")], "tokenizer.json has 262 tokens, but config.json vocab_size is 256")
    _nothing_left(tmp_path / "out")


def test_import_without_weights_or_config_is_named(tmp_path, capsys):
    (tmp_path / "hf").mkdir()
    _fails(capsys, ["import", "hf", str(tmp_path / "hf"), str(tmp_path / "out")], "config.json not found")
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 64, "n_embd": 64, "n_layer": 1, "n_head": 4}))
    _fails(capsys, ["import", "hf", str(tmp_path / "hf"), str(tmp_path / "out")], "no weights")
    _nothing_left(tmp_path / "out")


def test_export_refuses_a_shape_no_hf_architecture_has(tmp_path, capsys):
    options = {**MODELS["gpt2"], "position_embedding_type": "rope"}  # GPT-2 with RoPE: neither class computes it
    write_run(tmp_path / "run", options, build(options))
    _fails(capsys, ["export", "hf", str(tmp_path / "run"), str(tmp_path / "out")],
           "GPT2LMHeadModel: position_embedding_type rope (needs learned_absolute)", "LlamaForCausalLM: normalization LayerNorm")
    _nothing_left(tmp_path / "out")


def test_export_names_tensors_that_do_not_fit_the_spec(tmp_path, capsys):
    write_run(tmp_path / "run", MODELS["llama"], build(MODELS["llama"]))
    spec_path = tmp_path / "run" / "spec.resolved.yaml"
    spec = yaml.safe_load(spec_path.read_text())
    spec["model"]["ffn_hidden_size"] = 128
    spec_path.write_text(yaml.safe_dump(spec))
    _fails(capsys, ["export", "hf", str(tmp_path / "run"), str(tmp_path / "out")],
           "decoder.layers.mlp.linear_fc2.weight has shape (2, 64, 96), the model spec implies (2, 64, 128)")
    _nothing_left(tmp_path / "out")


def test_export_refuses_a_tokenizer_larger_than_the_vocabulary(tmp_path, capsys):
    options = {**MODELS["gpt2"], "vocab_size": 256}
    write_run(tmp_path / "run", options, build(options))
    _fails(capsys, ["export", "hf", str(tmp_path / "run"), str(tmp_path / "out")], "262 tokens but model.vocab_size is 256")
    _nothing_left(tmp_path / "out")


def test_export_refuses_a_non_empty_output_and_a_run_without_checkpoints(tmp_path, capsys):
    step_dir = write_run(tmp_path / "run", MODELS["gpt2"], build(MODELS["gpt2"]))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _fails(capsys, ["export", "hf", str(step_dir), str(out)], "exists and is not empty", "--overwrite")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert main(["export", "hf", str(step_dir), str(out), "--overwrite"]) == 0
    assert (out / "model.safetensors").exists() and not (out / "keep.txt").exists()
    (tmp_path / "empty-run" / "checkpoints").mkdir(parents=True)
    _fails(capsys, ["export", "hf", str(tmp_path / "empty-run"), str(tmp_path / "out2")], "no complete checkpoint")
    _nothing_left(tmp_path / "out2")


def test_export_refuses_a_damaged_checkpoint(tmp_path, capsys):
    step_dir = write_run(tmp_path / "run", MODELS["gpt2"], build(MODELS["gpt2"]))
    shard = next(p for p in (step_dir / "model").iterdir() if p.suffix == ".distcp")
    shard.write_bytes(shard.read_bytes()[:-8] + b"\0" * 8)
    _fails(capsys, ["export", "hf", str(step_dir), str(tmp_path / "out")], "fails its xxh3_64 checksum")
    _nothing_left(tmp_path / "out")


def test_export_options_are_checked_before_any_work(tmp_path, capsys):
    _fails(capsys, ["export", "hf", str(tmp_path), str(tmp_path / "out"), "--max-shard-size", "lots"], "--max-shard-size 'lots' is not a size")
    _fails(capsys, ["export", "hf", str(tmp_path / "nowhere"), str(tmp_path / "out")], "is not a directory")
    _nothing_left(tmp_path / "out")
