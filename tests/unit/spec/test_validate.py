"""`llmforge validate` on broken specs: every error located, with what is wrong and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
TINY = (ROOT / "specs" / "tiny.yaml").read_text()


def where(text: str, needle: str) -> str:
    """'spec.yaml:LINE:COL' of the first occurrence of `needle`."""
    for n, line in enumerate(text.splitlines(), 1):
        if needle in line:
            return f"spec.yaml:{n}:{line.index(needle) + 1}"
    raise AssertionError(f"{needle!r} not in spec")


def broken(write_spec, old: str, new: str) -> tuple[Path, str]:
    assert old in TINY
    text = TINY.replace(old, new, 1)
    return write_spec(text), text


# The four broken specs of the foundation issue's "Done when":
# (what, text replaced, replacement, the key the error must point at, message, hint).
DONE_WHEN = [
    ("typo'd key", "  num_layers: 4", "  num_layrs: 4", "num_layrs", "model.num_layrs: unknown key 'num_layrs'", "did you mean 'num_layers'?"),
    ("wrong type", "micro_batch_size: 8", "micro_batch_size: eight", "micro_batch_size",
     "stages[1].train.micro_batch_size: Input should be a valid integer, unable to parse string as an integer (got 'eight')", None),
    ("heads not divisible by TP", "stages:\n", "parallelism: {tensor_model_parallel_size: 8, nproc_per_node: 8}\nstages:\n",
     "tensor_model_parallel_size",
     "parallelism.tensor_model_parallel_size: num_attention_heads 4 is not divisible by tensor_model_parallel_size 8",
     "use a tensor-parallel size that divides 4 (e.g. 4)"),
    ("unknown optimizer", "{name: adamw,", "{name: adamww,", "name: adamww",
     "stages[1].train.optimizer.name: unknown optimizer 'adamww'; did you mean 'adamw'? (registered: adamw [llmforge 0.1.0], sgd [llmforge 0.1.0])",
     "pick a registered optimizer, or install the plugin that provides it"),
]


@pytest.mark.parametrize(("what", "old", "new", "key", "message", "hint"), DONE_WHEN, ids=[c[0] for c in DONE_WHEN])
def test_broken_specs_give_a_located_error_and_exit_2(write_spec, cli, what, old, new, key, message, hint):
    path, text = broken(write_spec, old, new)
    code, out, err = cli("validate", path)
    assert code == 2 and out == ""
    lines = err.splitlines()
    assert lines[0] == "error: 1 problem in the spec:", err
    assert lines[1].strip() == f"{where(text, key)} {message}"
    if hint:
        assert lines[2].strip() == f"hint: {hint}"
    assert "Traceback" not in err


def test_the_unmodified_tiny_spec_is_valid(write_spec, cli):
    code, out, err = cli("validate", write_spec(TINY))
    assert (code, err) == (0, "")
    assert "spec.yaml: valid — tiny: prepare (prepare), pretrain (pretrain)" in out


def test_every_problem_is_reported_at_once(write_spec, cli):
    path, _ = broken(write_spec, "  num_layers: 4", "  num_layrs: 4")
    code, _, err = cli("validate", path, "seed=-1", "stages.1.train.global_batch_size=12")
    assert code == 2
    assert err.startswith("error: 3 problems in the spec:")
    assert "override 'seed=-1' seed: Input should be greater than or equal to 0 (got -1)" in err
    assert "global_batch_size 12 is not divisible by micro_batch_size 8" in err


@pytest.mark.parametrize(
    ("override", "path", "hint"),
    [
        ("stagse=[]", "stagse", "did you mean 'stages'?"),
        ("stages.1.train.optimizer.weight_decy=0.1", "stages[1].train.optimizer.weight_decy", "did you mean 'weight_decay'?"),
        ("stages.1.train.lr=0.1", "stages[1].train.lr", "valid keys here: micro_batch_size, global_batch_size,"),
        ("tokenizer.vocab_sise=5", "tokenizer.vocab_sise", "did you mean 'vocab_size'?"),
        ("data.sources.stdlib.pathz=[]", "data.sources.stdlib.pathz", "did you mean 'paths'?"),
    ],
)
def test_unknown_keys_get_did_you_mean_or_the_valid_keys(write_spec, cli, override, path, hint):
    code, _, err = cli("validate", write_spec(TINY), override)
    assert code == 2
    assert f"override {override!r} {path}: unknown key" in err
    assert f"hint: {hint}" in err


def test_an_unknown_stage_type_lists_the_registered_ones(write_spec, cli):
    path, text = broken(write_spec, "type: pretrain", "type: pretrian")
    code, _, err = cli("validate", path)
    assert code == 2
    assert f"{where(text, 'type: pretrian')} stages[1].type: unknown stage 'pretrian'; did you mean 'pretrain'? (registered: " in err
    assert "prepare [llmforge 0.1.0]" in err


def test_a_component_without_a_name(write_spec, cli):
    path, text = broken(write_spec, "{name: adamw, lr", "{lr")
    code, _, err = cli("validate", path)
    assert code == 2
    assert f"{where(text, 'optimizer')} stages[1].train.optimizer.name: missing 'name': every component is chosen by name" in err


def test_a_required_key_that_is_missing(write_spec, cli):
    path, text = broken(write_spec, "  num_layers: 4\n", "")
    code, _, err = cli("validate", path)
    assert code == 2
    assert f"{where(text, 'model:')} model.num_layers: required key 'num_layers' is missing" in err


def test_an_error_in_an_extends_base_is_located_in_the_base(write_spec, cli):
    write_spec(TINY.replace("micro_batch_size: 8", "micro_batch_size: eight"), "base/tiny.yaml")
    child = write_spec("extends: base/tiny.yaml\nname: child\n")
    code, _, err = cli("validate", child)
    assert code == 2
    line = next(n for n, s in enumerate(TINY.splitlines(), 1) if "micro_batch_size" in s)
    assert f"base/tiny.yaml:{line}:7 stages[1].train.micro_batch_size" in err


def test_a_callback_nobody_registered_is_an_error_not_ignored(write_spec, cli):
    code, _, err = cli("validate", write_spec(TINY), "logging.callbacks=[{name: wandb}]")
    assert code == 2
    assert "logging.callbacks[0].name: unknown callback 'wandb' (registered: none)" in err


def test_bad_cli_usage_exits_2_without_a_traceback(cli):
    code, _, err = cli("validate")
    assert code == 2 and "usage:" in err
