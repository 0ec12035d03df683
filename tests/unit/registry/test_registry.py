"""The registry: built-ins as plugins, third-party plugins by entry point, and their failures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import Field

from llmforge import __version__
from llmforge.registry import Component, RegistryError, hookimpl
from llmforge.registry.components import KINDS
from llmforge.registry.manager import AUTOLOAD_ENV, build_registry
from llmforge.spec.base import StrictModel
from llmforge.spec.errors import SpecError
from llmforge.spec.load import load_spec
from llmforge.spec.validate import validate_loaded

ROOT = Path(__file__).resolve().parents[3]
TINY = ROOT / "specs" / "tiny.yaml"

# A plugin module that registers one optimizer; the name is formatted in per test.
OPTIMIZER_PLUGIN = """
from pydantic import Field
from llmforge.registry import Component, hookimpl
from llmforge.spec.base import StrictModel

class Options(StrictModel):
    lr: float = Field(0.1, gt=0, description="Learning rate.")

@hookimpl
def register_optimizers():
    return [Component({name!r}, Options, None, "a fake optimizer")]
"""


class FancyOptions(StrictModel):
    """A throwaway optimizer's options."""

    lr: float = Field(0.01, gt=0, description="Learning rate.")
    momentum: float = Field(0.0, ge=0, description="Momentum.")


def build_fancy(options: FancyOptions, *, params: list) -> dict:
    return {"options": options, "params": params}


class FancyPlugin:
    """A plugin can be any object with hookimpls, registered without an entry point."""

    @hookimpl
    def register_optimizers(self) -> list[Component]:
        return [Component("fancy", FancyOptions, build_fancy, "for tests")]


@pytest.fixture
def no_autoload(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(AUTOLOAD_ENV, "1")


def test_builtins_register_through_the_same_hooks(no_autoload):
    registry = build_registry()
    listing = registry.listing()
    assert {r["provider"] for r in listing} == {"llmforge"}
    assert {r["version"] for r in listing} == {__version__}
    for kind, name in [("tokenizer", "bpe"), ("source", "text"), ("model", "gpt"), ("optimizer", "adamw"),
                       ("lr_schedule", "cosine"), ("stage", "pretrain"), ("stage", "sft"), ("evaluator", "val_loss")]:
        assert name in registry.names(kind)


def test_a_throwaway_plugin_adds_a_component_with_checked_options(no_autoload):
    registry = build_registry([(FancyPlugin(), "fancy-dist", "2.0")])
    assert registry.get("optimizer", "fancy").label == "fancy [fancy-dist 2.0]"
    spec = validate_loaded(load_spec(TINY, ["stages.1.train.optimizer={name: fancy, lr: 0.5}"]), registry)
    options = spec.stages[1].train.optimizer
    assert (options.name, options.lr, options.momentum) == ("fancy", 0.5, 0.0)
    built = registry.build("optimizer", options, params=["w"])
    assert built == {"options": options, "params": ["w"]}

    with pytest.raises(SpecError) as e:
        validate_loaded(load_spec(TINY, ["stages.1.train.optimizer={name: fancy, momentum: lots}"]), registry)
    [issue] = e.value.issues
    assert issue.path == ("stages", 1, "train", "optimizer", "momentum")
    assert issue.location == "override 'stages.1.train.optimizer={name: fancy, momentum: lots}'"


def test_unknown_names_list_every_registered_one_with_its_provider(no_autoload):
    registry = build_registry([(FancyPlugin(), "fancy-dist", "2.0")])
    assert registry.unknown_message("optimizer", "fancyy") == (
        f"unknown optimizer 'fancyy'; did you mean 'fancy'? (registered: adamw [llmforge {__version__}], "
        f"fancy [fancy-dist 2.0], sgd [llmforge {__version__}])"
    )
    with pytest.raises(RegistryError, match="unknown optimizer 'lion2'"):
        registry.get("optimizer", "lion2")


def test_a_duplicate_name_is_rejected_naming_both_providers(no_autoload):
    class Duplicate:
        @hookimpl
        def register_optimizers(self) -> list[Component]:
            return [Component("adamw", FancyOptions)]

    with pytest.raises(RegistryError) as e:
        build_registry([(Duplicate(), "dup-dist", "1.0")])
    assert str(e.value).startswith(f"optimizer 'adamw' is registered twice: by llmforge {__version__} and by dup-dist 1.0;")


def test_two_installed_plugins_with_one_name_exit_2_naming_both(fake_dist, cli):
    fake_dist("plugin-one", "1.0", OPTIMIZER_PLUGIN.format(name="lion2"))
    fake_dist("plugin-two", "3.1", OPTIMIZER_PLUGIN.format(name="lion2"))
    for args in (["plugins"], ["validate", TINY]):
        code, out, err = cli(*args)
        assert code == 2, err
        assert "optimizer 'lion2' is registered twice: by plugin-one 1.0 and by plugin-two 3.1" in err
        assert "Traceback" not in err


def test_an_installed_plugin_is_found_by_its_entry_point(fake_dist, cli):
    fake_dist("plugin-one", "1.0", OPTIMIZER_PLUGIN.format(name="lion2"))
    code, out, _ = cli("plugins", "--json")
    assert code == 0
    assert {"kind": "optimizer", "name": "lion2", "provider": "plugin-one", "version": "1.0", "description": "a fake optimizer"} in json.loads(out)
    code, _, err = cli("validate", TINY, "stages.1.train.optimizer={name: lion2, lr: 0.3}")
    assert (code, err) == (0, "")


def test_autoload_off_ignores_entry_points(fake_dist, cli, monkeypatch):
    fake_dist("plugin-one", "1.0", OPTIMIZER_PLUGIN.format(name="lion2"))
    monkeypatch.setenv(AUTOLOAD_ENV, "1")
    code, out, _ = cli("plugins", "--json")
    assert code == 0 and "lion2" not in out
    code, _, err = cli("validate", TINY, "stages.1.train.optimizer={name: lion2}")
    assert code == 2 and "unknown optimizer 'lion2'" in err


def test_a_plugin_that_fails_to_import_costs_one_warning_line(fake_dist, cli):
    fake_dist("broken-plugin", "0.3", "import a_module_that_is_not_installed\n")
    code, out, err = cli("validate", TINY)
    assert code == 0, err
    mine = [line for line in err.splitlines() if "broken-plugin" in line]
    assert mine == [
        f"warning: plugin broken-plugin 0.3 (entry point 'broken-plugin' = {mine[0].split(' = ')[1].split(')')[0]}) failed to import: "
        "ModuleNotFoundError: No module named 'a_module_that_is_not_installed'; switch it off with LLMFORGE_DISABLE_PLUGINS=broken-plugin"
    ]
    assert "Traceback" not in err and "valid — tiny: prepare (prepare), pretrain (pretrain)" in out


def test_a_hook_that_raises_is_a_warning_and_the_rest_still_works(fake_dist, cli):
    fake_dist("raising-plugin", "0.1", """
        from llmforge.registry import hookimpl

        @hookimpl
        def register_evaluators():
            raise RuntimeError("no GPU here")
    """)
    code, out, err = cli("validate", TINY)
    assert code == 0
    assert "warning: plugin raising-plugin 0.1: register_evaluators() failed: RuntimeError: no GPU here" in err


def test_a_misspelt_hook_stops_every_command_naming_the_hook_and_the_fix(fake_dist, cli):
    fake_dist("typo-plugin", "0.1", """
        from llmforge.plugin import hookimpl

        @hookimpl
        def register_optimisers():
            return []
    """)
    for args in (["plugins"], ["validate", TINY], ["schema"]):
        code, _, err = cli(*args)
        assert code == 2 and "Traceback" not in err
        assert err.strip() == ("error: plugin typo-plugin 0.1 implements 'register_optimisers', which is no llmforge hook; "
                               "did you mean 'register_optimizers'? Fix the plugin, or switch it off with "
                               "LLMFORGE_DISABLE_PLUGINS=typo-plugin")


def test_a_hook_returning_something_else_is_an_error_naming_the_plugin(no_autoload):
    class Wrong:
        @hookimpl
        def register_models(self) -> list:
            return [{"name": "gpt2"}]

    with pytest.raises(RegistryError, match="wrong-dist returned {'name': 'gpt2'} from register_models; expected llmforge.registry.Component"):
        build_registry([(Wrong(), "wrong-dist", "1")])


def test_plugins_json_is_a_list_of_kind_name_provider_version(cli, monkeypatch):
    monkeypatch.setenv(AUTOLOAD_ENV, "1")
    code, out, _ = cli("plugins", "--json")
    rows = json.loads(out)
    assert code == 0 and isinstance(rows, list) and rows
    assert all(set(r) == {"kind", "name", "provider", "version", "description"} and all(isinstance(v, str) for v in r.values())
               for r in rows)
    assert {"kind": "optimizer", "name": "adamw", "provider": "llmforge", "version": __version__, "description": "torch AdamW"} in rows
    assert {r["kind"] for r in rows} <= set(KINDS)


def test_plugins_text_lists_kind_name_and_provider(cli, monkeypatch):
    monkeypatch.setenv(AUTOLOAD_ENV, "1")
    code, out, _ = cli("plugins")
    assert code == 0
    assert any(line.split() == ["optimizer", "adamw", "llmforge", __version__, "torch", "AdamW"] for line in out.splitlines())


def test_run_refuses_a_declared_but_unbuilt_component_by_name(no_autoload):
    class Declared:
        @hookimpl
        def register_models(self) -> list[Component]:
            return [
                Component("mamba", FancyOptions, None),
                Component("rwkv", FancyOptions, "no_such_module_here:build"),
            ]

    registry = build_registry([(Declared(), "ssm-dist", "0.1")])
    with pytest.raises(RegistryError, match=r"model 'mamba' \(ssm-dist 0.1\) is declared but not implemented yet"):
        registry.factory("model", "mamba")
    with pytest.raises(RegistryError, match="model 'rwkv' from ssm-dist: cannot import its factory 'no_such_module_here:build'"):
        registry.factory("model", "rwkv")
