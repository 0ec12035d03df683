"""`llmforge export hf --peft`: the adapters of a LoRA checkpoint, loaded by transformers + peft
onto the exported base, compute what llmforge's adapted (unmerged) model computes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llmforge.cli import main
from llmforge.interop.export import export_hf

from .peft_worker import LORA, TARGETS, save_lora_run
from .tiny import MODELS, build, byte_tokenizer, forward, random_ids, run_two_ranks, write_run

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
ATOL = 1e-4
WORKER = Path(__file__).with_name("peft_worker.py")


def _logits(model, ids) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(ids).logits.float()


def _peft_model(out: Path):
    base = transformers.AutoModelForCausalLM.from_pretrained(out / "base", dtype=torch.float32)
    return peft.PeftModel.from_pretrained(base, out)


@pytest.mark.parametrize(("arch", "targets", "merge", "names"), [
    ("llama", TARGETS, False, ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]),
    ("gpt2", TARGETS, True, ["c_attn", "c_fc", "c_proj"]),
    # Only the attention's c_proj is adapted; a bare `c_proj` would adapt the MLP's too.
    ("gpt2", ["linear_qkv", "linear_proj"], False, ["attn.c_proj", "c_attn"]),
])
def test_peft_adapters_on_the_exported_base_give_llmforge_lora_logits(tmp_path, arch, targets, merge, names, hf_logits):
    module = build(MODELS[arch])
    ids = random_ids()
    base_logits = forward(module, ids)
    save_lora_run(tmp_path / "run", MODELS[arch], [module], targets=targets, merge=merge)
    ours = forward(module, ids)  # the adapted model, unmerged: W x + (alpha / r) B A x
    assert (ours - base_logits).abs().max() > 0.05  # the random B changes the model

    out = tmp_path / "peft"
    done = export_hf(tmp_path / "run", out, peft=True)
    assert done["checkpoint"].endswith("lora/step-5") and done["base_checkpoint"].endswith("pretrain/step-3")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (LORA["rank"], LORA["alpha"], LORA["dropout"])
    assert config["target_modules"] == names
    assert config["fan_in_fan_out"] is (arch == "gpt2")
    assert config["base_model_name_or_path"] == str(out.absolute() / "base")
    adapters = peft.utils.load_peft_weights(str(out))
    layer = "base_model.model.model.layers.0.self_attn.q_proj" if arch == "llama" else "base_model.model.transformer.h.0.attn.c_attn"
    assert adapters[f"{layer}.lora_A.weight"].shape == (LORA["rank"], 64)
    assert len(adapters) == 2 * done["adapted_modules"]

    # The base is the frozen init checkpoint, unmerged; the adapters on top of it give the LoRA model.
    torch.testing.assert_close(hf_logits(out / "base", ids), base_logits, atol=ATOL, rtol=0)
    model = _peft_model(out)
    torch.testing.assert_close(_logits(model, ids), ours, atol=ATOL, rtol=0)
    # PEFT's own merge equals our merged export.
    export_hf(tmp_path / "run", tmp_path / "merged")
    torch.testing.assert_close(_logits(model.merge_and_unload(), ids), hf_logits(tmp_path / "merged", ids), atol=ATOL, rtol=0)


def test_peft_export_through_the_cli_loads_with_auto_peft_model(tmp_path, capsys):
    module = build(MODELS["llama"])
    save_lora_run(tmp_path / "run", MODELS["llama"], [module])
    out = tmp_path / "peft"
    assert main(["export", "hf", str(tmp_path / "run"), str(out), "--stage", "lora", "--peft"]) == 0
    printed = capsys.readouterr().out
    assert "PEFT format" in printed and "r=4, lora_alpha=12" in printed
    # base_model_name_or_path lets PEFT find the base by itself; the tokenizer comes along.
    model = peft.AutoPeftModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = random_ids(seed=3)
    ours = forward(module, ids)
    torch.testing.assert_close(_logits(model, ids), ours, atol=ATOL, rtol=0)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert tokenizer("héllo")["input_ids"] == byte_tokenizer().encode("héllo")

    from safetensors import safe_open

    export_hf(tmp_path / "run", tmp_path / "bf16", peft=True, dtype="bfloat16")
    with safe_open(tmp_path / "bf16" / "adapter_model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert json.loads((tmp_path / "bf16" / "base" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    torch.testing.assert_close(_logits(_peft_model(tmp_path / "bf16"), ids), ours, atol=0.1, rtol=0)  # bf16 rounding


def test_the_peft_self_check_refuses_adapters_peft_computes_differently(tmp_path, monkeypatch):
    """PEFT on the written base must give llmforge's unmerged LoRA logits; here B is written twice too large."""
    from llmforge.interop import peft_export
    from llmforge.interop.verify import ExportCheckFailed

    module = build(MODELS["llama"])
    save_lora_run(tmp_path / "run", MODELS["llama"], [module])
    real = peft_export.adapter_tensors

    def doubled(*args, **kwargs):
        tensors, adapted = real(*args, **kwargs)
        return {n: 2 * t if n.endswith("lora_B.weight") else t for n, t in tensors.items()}, adapted

    monkeypatch.setattr(peft_export, "adapter_tensors", doubled)
    messages: list[str] = []
    with pytest.raises(ExportCheckFailed, match="nothing was written"):
        export_hf(tmp_path / "run", tmp_path / "peft", peft=True, log=messages.append)
    assert messages[0].startswith("self-check (peft LoRA on transformers LlamaForCausalLM)") and messages[0].endswith("FAILED")
    assert not (tmp_path / "peft").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".peft.")]
    monkeypatch.setattr(peft_export, "adapter_tensors", real)
    assert export_hf(tmp_path / "run", tmp_path / "peft", peft=True, log=messages.append)["check"]["passed"]


def test_peft_refuses_a_checkpoint_without_adapters(tmp_path, capsys):
    write_run(tmp_path / "run", MODELS["gpt2"], build(MODELS["gpt2"]))
    out = tmp_path / "peft"
    assert main(["export", "hf", str(tmp_path / "run"), str(out), "--peft"]) == 2
    err = capsys.readouterr().err
    assert "is not a LoRA checkpoint" in err and "drop --peft" in err and "Traceback" not in err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".peft.")]


@pytest.mark.slow
def test_peft_export_of_a_tp2_lora_checkpoint_gives_the_sharded_models_logits(tmp_path):
    """Column-parallel B (split by rows, swiglu fc1 as two halves) and row-parallel A (split by columns) are gathered."""
    run_dir = tmp_path / "run"
    run_two_ranks(WORKER, {"run_dir": str(run_dir), "options": MODELS["llama"], "tp": 2, "seed": 21})
    export_hf(run_dir, tmp_path / "peft", peft=True)
    torch.testing.assert_close(_logits(_peft_model(tmp_path / "peft"), random_ids()), torch.load(run_dir / "logits.pt"),
                               atol=ATOL, rtol=0)
