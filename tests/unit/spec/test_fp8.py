"""precision: fp8 on a machine without CUDA or TransformerEngine: what validate, run and plan say.

The run path itself (TE layers with megatron's FP8 recipe) needs CUDA and TransformerEngine:
tests/gpu/test_fp8.py, skipped here, and a line of benchmarks/gpu_check.py.
"""

from __future__ import annotations

import dataclasses
import json

import pytest

from llmforge.spec import checks_precision
from llmforge.spec.stages import TrainConfig

FP8 = "stages.1.train.precision=fp8"


@pytest.fixture
def without_te(monkeypatch):
    monkeypatch.setattr(checks_precision, "transformer_engine_installed", lambda: False)


@pytest.fixture
def with_te(monkeypatch):
    monkeypatch.setattr(checks_precision, "transformer_engine_installed", lambda: True)


def test_validate_refuses_fp8_without_transformer_engine_naming_the_extra(write_spec, cli, without_te):
    code, _, err = cli("validate", write_spec(), FP8)
    assert code == 2
    assert "stages[1].train.precision" in err and "precision fp8 runs through TransformerEngine, which is not installed here" in err
    assert 'pip install -e ".[gpu]"' in err and "or use precision: bf16" in err
    # Where the run lives elsewhere (a cluster), --skip-inputs and plan do not ask for TE here.
    assert cli("validate", write_spec(), FP8, "--skip-inputs")[0] == 0
    assert cli("plan", write_spec(), FP8, "--json")[0] == 0


def test_validate_accepts_fp8_where_transformer_engine_is_installed(write_spec, cli, with_te):
    code, out, err = cli("validate", write_spec(), FP8, "stages.1.train.fp8_recipe=tensorwise", "stages.1.train.fp8_format=e4m3")
    assert code == 0, err


def test_the_lookup_is_find_spec_not_an_import(monkeypatch):
    asked = []
    monkeypatch.setattr(checks_precision.importlib.util, "find_spec", lambda name: asked.append(name))
    assert checks_precision.transformer_engine_installed() is False and asked == ["transformer_engine"]


def test_fp8_fields_are_megatrons_with_megatrons_defaults():
    """Independent of llmforge: the names and defaults of megatron-core's TransformerConfig."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    fields = {f.name: f.default for f in dataclasses.fields(TransformerConfig)}
    options = TrainConfig(micro_batch_size=1, global_batch_size=1, max_steps=1, precision="fp8").fp8_options()
    assert set(options) <= set(fields)
    assert {k: v for k, v in options.items() if k != "fp8"} == {k: fields[k] for k in options if k != "fp8"}
    assert options["fp8"] == "hybrid"  # megatron leaves the format unset (no FP8); Megatron-LM users pass --fp8-format hybrid
    given = TrainConfig(micro_batch_size=1, global_batch_size=1, max_steps=1, precision="fp8", fp8_recipe="delayed",
                        fp8_amax_history_len=1024, fp8_amax_compute_algo="max", fp8_margin=1, fp8_wgrad=False).fp8_options()
    assert given == {"fp8": "hybrid", "fp8_recipe": "delayed", "fp8_margin": 1, "fp8_amax_history_len": 1024,
                     "fp8_amax_compute_algo": "max", "fp8_wgrad": False}
    assert TrainConfig(micro_batch_size=1, global_batch_size=1, max_steps=1, precision="bf16").fp8_options() is None


@pytest.mark.parametrize(("overrides", "where", "words"), [
    (["stages.1.train.fp8_margin=1"], "stages[1].train.fp8_margin", "fp8_margin applies only with precision: fp8 (precision is fp32)"),
    ([FP8, "stages.1.train.fp8_recipe=tensorwise", "stages.1.train.fp8_amax_history_len=16"], "stages[1].train.fp8_amax_history_len",
     "fp8_amax_history_len applies only to the delayed recipe (fp8_recipe is tensorwise)"),
    ([FP8, "stages.1.train.fp8_recipe=e5m2"], "stages[1].train.fp8_recipe", "Input should be 'delayed', 'tensorwise', 'blockwise' or 'mxfp8'"),
])
def test_fp8_fields_refused_where_they_do_not_apply(write_spec, cli, with_te, overrides, where, words):
    code, _, err = cli("validate", write_spec(), *overrides)
    assert code == 2 and where in err and words in err, err


def test_run_refuses_fp8_without_a_cuda_device():
    """`run`'s own refusal (a fact of the machine): the model is never built in bf16 silently."""
    from llmforge.models.gpt import transformer_config
    from llmforge.spec.errors import UserError
    from llmforge.testing import validate_spec

    spec = validate_spec(["stages.1.train.precision=bf16"])
    with pytest.raises(UserError) as error:
        transformer_config(spec.model, spec.parallelism, precision="fp8", fp8={"fp8": "hybrid"})
    assert "precision fp8 runs on CUDA GPUs" in str(error.value) and "this process has no CUDA device" in str(error.value)
    assert "use precision: bf16 here" in error.value.hint


# --- the plan --------------------------------------------------------------------------

ONE_B = "specs/gpu-1b.yaml"


def plan(cli, *args: str) -> dict:
    code, out, err = cli("plan", ONE_B, *args, "--gpu", "h200-141gb", "--json")
    assert code == 0, err
    return json.loads(out)["stages"][1]


def test_plan_fp8_keeps_bf16_weights_adds_fp8_copies_and_saves_fp8_linear_inputs(cli):
    """The 1B spec (16 layers, hidden 2048, SwiGLU 5632, 16 heads without GQA, micro batch 16 × 2048)."""
    bf16, fp8 = plan(cli), plan(cli, FP8)
    (a,), (b,) = bf16["memory_per_rank"], fp8["memory_per_rank"]
    for key in ("weights", "gradients", "optimizer_states", "logits", "loss_workspace"):
        assert a[key] == b[key], key
    h, ffn, layers, tokens = 2048, 5632, 16, 16 * 2048
    layer_params = 4 * h * h + 3 * ffn * h + 2 * h  # QKV, projection, fc1 (gate + up), fc2, two RMSNorms
    assert a["fp8_weights"] == 0 and b["fp8_weights"] == 2 * layers * layer_params
    # QKV, projection and fc1 inputs (hidden wide) and fc2's input (ffn wide) at 1 byte instead of 2.
    assert a["activations"] - b["activations"] == layers * tokens * (3 * h + ffn)
    assert b["total"] < a["total"]


def test_plan_fp8_time_takes_the_layers_gemms_faster(cli):
    from llmforge.plan.cost import FP8_GEMM_SPEEDUP

    bf16, fp8 = plan(cli), plan(cli, FP8)
    h, ffn, layers, vocab, seq = 2048, 5632, 16, 32000, 2048
    gemm = 6 * layers * (4 * h * h + 3 * ffn * h + 2 * h)
    total = gemm + 6 * vocab * h + 6 * h + 6 * layers * h * seq  # + output layer, final norm, attention
    expected = (total - gemm + gemm / FP8_GEMM_SPEEDUP) / total
    assert fp8["step_time"]["fp8_factor"] == pytest.approx(expected, rel=1e-9)
    assert fp8["step_time_s"] == pytest.approx(bf16["step_time_s"] * expected, rel=1e-9)
    assert 0.6 < expected < 0.8  # ~1.3-1.5× end to end, not the FP8 peak's 2×


@pytest.mark.parametrize("device", ["a100-80gb", "cpu"])
def test_plan_refuses_fp8_on_a_device_without_fp8_matmuls(cli, device):
    code, _, err = cli("plan", ONE_B, FP8, "--gpu", device)
    assert code == 2
    assert f"trains in precision fp8, and {device}" in err and "has no FP8 matmuls" in err and "--gpu h100-80gb" in err
