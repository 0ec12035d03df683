"""`llmforge export hf` for Llama 3.x, Mistral, Qwen2.5 and Qwen3: the family's own class and config,
an exact round trip of an untouched import, and the self-check that refuses to publish an export
transformers computes differently (exit 1, nothing in OUT_DIR).

The four tiny families (made by transformers, `families_tiny`) are imported once per module.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from llmforge.cli import main
from llmforge.interop.export import export_hf, export_target, import_record
from llmforge.interop.hf_files import read_hf_weights
from llmforge.interop.import_ import import_hf
from llmforge.spec.components import GPTModel

from .families_tiny import FAMILIES, save_family

transformers = pytest.importorskip("transformers")
HF_CLASS = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "generation_config.json")
VOLATILE = {"transformers_version", "_name_or_path"}
# The tight fp32 bound the self-check must meet on an untouched model (its tolerance is 1e-3).
EXACT = 1e-5


@pytest.fixture(scope="module")
def imports(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """family → (HF dir, import dir); Mistral's weights are bf16, to check that a round trip keeps them so."""
    root = tmp_path_factory.mktemp("family-export")
    made = {}
    for family in FAMILIES:
        hf_dir = save_family(family, root / "hf" / family)
        if family == "mistral":
            model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.bfloat16)
            model.save_pretrained(hf_dir)
        import_hf(hf_dir, root / "out" / family)
        made[family] = (hf_dir, root / "out" / family)
    return made


def _config(path: Path) -> dict:
    return {k: v for k, v in transformers.AutoConfig.from_pretrained(path).to_dict().items() if k not in VOLATILE}


@pytest.mark.parametrize("family", FAMILIES)
def test_import_then_export_gives_back_the_same_model(imports, tmp_path, family):
    hf_dir, out = imports[family]
    messages: list[str] = []
    done = export_hf(out, tmp_path / "back", log=messages.append)
    back = tmp_path / "back"
    assert done["architecture"] == HF_CLASS[family]
    assert json.loads((back / "config.json").read_text())["architectures"] == [HF_CLASS[family]]
    assert _config(back) == _config(hf_dir)
    original, exported = read_hf_weights(hf_dir), read_hf_weights(back)
    assert original.keys() == exported.keys()
    for name, tensor in original.items():
        assert (exported[name].dtype, exported[name].shape) == (tensor.dtype, tensor.shape), name
        assert exported[name].view(torch.uint8).numpy().tobytes() == tensor.view(torch.uint8).numpy().tobytes(), name
    for name in FILES:
        if (hf_dir / name).is_file():
            assert (back / name).read_bytes() == (hf_dir / name).read_bytes(), name
    # The self-check ran, printed its figure and found the untouched model exact.
    check = done["check"]
    assert check["passed"] and check["relative"] < EXACT and check["tolerance"] == 1e-3, check
    assert messages == [f"self-check (transformers {HF_CLASS[family]}): max |logit difference| {check['max_abs_diff']:.3g} = "
                        f"{check['relative']:.2g} of the logit scale {check['logit_scale']:.3g} (tolerance {check['tolerance']:g}): passed"]


def _swap_two_query_heads(monkeypatch) -> None:
    """A layout bug of the kind converters make: q_proj's first two heads trade places in the file."""
    from llmforge.interop import hf_mapping

    real = hf_mapping.link_to_hf

    def wrong(link, tensor, d):
        out = real(link, tensor, d)
        if link.kind != "qkv":
            return out
        q = out[0].clone()
        q[: d.head_dim], q[d.head_dim: 2 * d.head_dim] = out[0][d.head_dim: 2 * d.head_dim], out[0][: d.head_dim]
        return (q, *out[1:])

    monkeypatch.setattr(hf_mapping, "link_to_hf", wrong)


def test_the_self_check_refuses_a_wrong_export_and_no_verify_publishes_it(imports, tmp_path, monkeypatch, capsys):
    _, out = imports["qwen3"]
    _swap_two_query_heads(monkeypatch)
    target = tmp_path / "back"
    assert main(["export", "hf", str(out), str(target)]) == 1
    captured = capsys.readouterr()
    assert "self-check (transformers Qwen3ForCausalLM): max |logit difference|" in captured.out and ": FAILED" in captured.out
    assert "nothing was written" in captured.err and "Traceback" not in captured.err
    assert not target.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".back.")]

    assert main(["export", "hf", str(out), str(target), "--no-verify"]) == 0
    captured = capsys.readouterr()
    assert "self-check" not in captured.out and "not checked (--no-verify)" in captured.out
    assert (target / "model.safetensors").is_file()


def test_without_transformers_the_check_is_skipped_and_said_so(imports, tmp_path, monkeypatch):
    from llmforge.interop import verify

    monkeypatch.setattr(verify, "missing_library", lambda *names: names[0])
    messages: list[str] = []
    done = export_hf(imports["llama"][1], tmp_path / "back", log=messages.append)
    assert done["check"] is None and (tmp_path / "back" / "config.json").is_file()
    assert messages == ["self-check skipped: transformers is not installed (pip install transformers to check the export against it)"]


def test_a_run_started_from_an_import_exports_as_its_family(imports, tmp_path):
    """The record is followed through a stage's init_from: a finetuned Mistral stays MistralForCausalLM."""
    _, out = imports["mistral"]
    model = yaml.safe_load((out / "model.yaml").read_text())["model"]
    run = tmp_path / "run"
    run.mkdir()
    spec = {"name": "ft", "model": model, "stages": [{"name": "sft", "type": "sft", "init_from": str(out / "checkpoints/import/step-0")}]}
    (run / "spec.resolved.yaml").write_text(yaml.safe_dump(spec))
    options = GPTModel.model_validate({k: v for k, v in model.items() if k != "name"})
    assert import_record(run)["family"] == "mistral"
    assert export_target(run, options).family.hf_class == "MistralForCausalLM"
    # A model the record's family cannot represent any more falls back to its shape.
    changed = options.model_copy(update={"add_qkv_bias": True})
    assert export_target(run, changed).family.hf_class == "Qwen2ForCausalLM"


@pytest.mark.parametrize(("family", "expected"),
                         [("qwen3", "Qwen3ForCausalLM"), ("qwen2", "Qwen2ForCausalLM"), ("mistral", "LlamaForCausalLM")])
def test_without_a_record_the_shape_picks_the_class(imports, tmp_path, family, expected):
    model = yaml.safe_load((imports[family][1] / "model.yaml").read_text())["model"]
    options = GPTModel.model_validate({k: v for k, v in model.items() if k != "name"})
    assert export_target(tmp_path, options).family.hf_class == expected
