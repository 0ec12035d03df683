"""Loading: extends, positions, interpolation, resolvers and dotlist overrides."""

from __future__ import annotations

import sysconfig

import pytest

from llmforge.spec.errors import SpecError
from llmforge.spec.load import load_spec


def test_positions_point_at_each_key_and_list_item(write_spec):
    path = write_spec("name: t\nmodel:\n  name: gpt\n  num_layers: 2\nstages:\n  - name: a\n  - name: b\n")
    loaded = load_spec(path)
    assert loaded.locations[("model", "num_layers")] == "spec.yaml:4:3"
    assert loaded.locations[("stages", 1)] == "spec.yaml:7:5"
    # A key that is not there is located at its nearest parent.
    assert loaded.locate(("model", "hidden_size")) == "spec.yaml:2:1"


def test_extends_one_base_merges_and_keeps_the_base_positions(write_spec):
    write_spec("name: base\nseed: 1\nmodel:\n  name: gpt\n  num_layers: 2\n  hidden_size: 64\n", "bases/base.yaml")
    child = write_spec("extends: bases/base.yaml\nname: child\nmodel:\n  num_layers: 4\n")
    loaded = load_spec(child)
    assert loaded.data == {"name": "child", "seed": 1, "model": {"name": "gpt", "num_layers": 4, "hidden_size": 64}}
    assert "extends" not in loaded.data
    assert loaded.locations[("model", "hidden_size")] == "bases/base.yaml:6:3"
    assert loaded.locations[("model", "num_layers")] == "spec.yaml:4:3"
    assert loaded.files == ["spec.yaml", "bases/base.yaml"]


def test_extends_a_list_merges_in_order_then_the_file_itself(write_spec):
    write_spec("seed: 1\nname: a\nrun_dir: from_a\n", "a.yaml")
    write_spec("seed: 2\nrun_dir: from_b\n", "b.yaml")
    loaded = load_spec(write_spec("extends: [a.yaml, b.yaml]\nrun_dir: mine\n"))
    assert loaded.data == {"seed": 2, "name": "a", "run_dir": "mine"}
    assert loaded.locations[("seed",)] == "b.yaml:1:1"
    assert loaded.locations[("name",)] == "a.yaml:2:1"


def test_extends_paths_resolve_against_the_spec_file_not_the_cwd(write_spec, tmp_path, monkeypatch):
    write_spec("seed: 7\n", "conf/base.yaml")
    child = write_spec("extends: base.yaml\nname: x\n", "conf/child.yaml")
    monkeypatch.chdir(tmp_path / "conf")
    assert load_spec(child).data["seed"] == 7


def test_a_list_in_the_child_replaces_the_base_list_and_its_positions(write_spec):
    write_spec("stages:\n  - name: a\n  - name: b\n  - name: c\n", "base.yaml")
    loaded = load_spec(write_spec("extends: base.yaml\nstages:\n  - name: z\n"))
    assert loaded.data["stages"] == [{"name": "z"}]
    assert ("stages", 2) not in loaded.locations
    assert loaded.locations[("stages", 0)] == "spec.yaml:3:5"


def test_circular_extends_is_an_error(write_spec):
    write_spec("extends: b.yaml\n", "a.yaml")
    write_spec("extends: a.yaml\n", "b.yaml")
    with pytest.raises(SpecError, match="circular extends"):
        load_spec("a.yaml")


def test_missing_base_names_the_spec_that_extends_it(write_spec):
    with pytest.raises(SpecError) as e:
        load_spec(write_spec("extends: nowhere.yaml\nname: x\n"))
    [issue] = e.value.issues
    assert issue.message == "extends 'nowhere.yaml': 'nowhere.yaml' does not exist"
    assert issue.location == "spec.yaml:1:1"


def test_interpolation_and_env_with_default(write_spec, monkeypatch):
    monkeypatch.delenv("LLMFORGE_TEST_DATA", raising=False)
    path = write_spec("model: {seq_length: 128}\nother: ${model.seq_length}\ndata: '${oc.env:LLMFORGE_TEST_DATA,/data}/x'\n")
    assert load_spec(path).data == {"model": {"seq_length": 128}, "other": 128, "data": "/data/x"}
    monkeypatch.setenv("LLMFORGE_TEST_DATA", "/mnt")
    assert load_spec(path).data["data"] == "/mnt/x"


def test_stdlib_resolver_is_the_python_standard_library(write_spec):
    loaded = load_spec(write_spec("paths: ['${stdlib:}/**/*.py']\n"))
    assert loaded.data["paths"] == [sysconfig.get_paths()["stdlib"] + "/**/*.py"]


def test_interpolation_sees_overrides(write_spec):
    path = write_spec("model: {seq_length: 128}\nother: ${model.seq_length}\n")
    assert load_spec(path, ["model.seq_length=64"]).data["other"] == 64


def test_a_broken_interpolation_is_located_at_its_key(write_spec):
    with pytest.raises(SpecError) as e:
        load_spec(write_spec("name: x\nseed: ${nope.missing}\n"))
    [issue] = e.value.issues
    assert issue.path == ("seed",) and issue.location == "spec.yaml:2:1"
    assert "interpolation" in issue.message


def test_overrides_set_nested_keys_list_items_and_typed_values(write_spec):
    path = write_spec("stages:\n  - name: a\n  - name: b\n    train: {max_steps: 100}\nmodel: {num_layers: 2}\n")
    loaded = load_spec(path, ["stages.1.train.max_steps=10", "model.num_layers=4", "model.norm_epsilon=1.0e-6", "name=run"])
    assert loaded.data["stages"][1]["train"]["max_steps"] == 10
    assert loaded.data["model"] == {"num_layers": 4, "norm_epsilon": 1e-6}
    assert loaded.data["name"] == "run"
    assert loaded.locations[("stages", 1, "train", "max_steps")] == "override 'stages.1.train.max_steps=10'"


def test_a_mapping_override_merges_and_relocates_only_what_it_sets(write_spec):
    loaded = load_spec(write_spec("model:\n  num_layers: 2\n  hidden_size: 64\n"), ["model={num_layers: 3}"])
    assert loaded.data["model"] == {"num_layers": 3, "hidden_size": 64}
    assert loaded.locate(("model", "num_layers")) == "override 'model={num_layers: 3}'"
    assert loaded.locate(("model", "hidden_size")) == "spec.yaml:3:3"


def test_an_override_that_switches_component_replaces_its_options(write_spec):
    path = write_spec("optimizer: {name: adamw, lr: 0.1, betas: [0.9, 0.95]}\n")
    assert load_spec(path, ["optimizer={name: sgd, momentum: 0.9}"]).data["optimizer"] == {"name": "sgd", "momentum": 0.9}
    assert load_spec(path, ["optimizer={name: adamw, lr: 0.2}"]).data["optimizer"] == {"name": "adamw", "lr": 0.2, "betas": [0.9, 0.95]}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.num_layers", "not KEY=VALUE"),
        ("=3", "not KEY=VALUE"),
        ("model..num_layers=3", "empty key part"),
        ("stages.5.name=x", "cannot apply override"),
    ],
)
def test_bad_overrides_name_the_override(write_spec, override, message):
    with pytest.raises(SpecError) as e:
        load_spec(write_spec("stages:\n  - name: a\n"), [override])
    [issue] = e.value.issues
    assert message in issue.message and issue.location == f"override {override!r}"


@pytest.mark.parametrize(
    ("text", "message", "location"),
    [
        ("", "the spec file is empty", "spec.yaml"),
        ("- just\n- a list\n", "must be a mapping", "spec.yaml"),
        ("name: x\nmodel: {a: 1\n", "invalid YAML", "spec.yaml:3:1"),
        ("name: x\n  bad: indent\n", "invalid YAML", "spec.yaml:2:6"),
        ("extends: 3\n", "extends must be a path", "spec.yaml:1:1"),
        ("extends: .\n", "is a directory", "spec.yaml:1:1"),
        ("name: x\nrun_dir: '${oops'\n", "invalid interpolation", "spec.yaml:2:1"),
        ("name: x\nseed: 2024-01-01\n", "unsupported value", "spec.yaml:2:1"),
    ],
)
def test_unreadable_specs_give_located_errors(write_spec, text, message, location):
    with pytest.raises(SpecError) as e:
        load_spec(write_spec(text))
    [issue] = e.value.issues
    assert message in issue.message and issue.location == location


def test_missing_file_and_non_utf8(write_spec, tmp_path):
    with pytest.raises(SpecError, match="spec file not found"):
        load_spec(tmp_path / "absent.yaml")
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(b"name: caf\xe9\n")
    with pytest.raises(SpecError, match="cannot read"):
        load_spec(bad)
