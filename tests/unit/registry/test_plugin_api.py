"""Plugin API v1: `llmforge.plugin`, the factory contract, metric keys, plugin errors and switches."""

from __future__ import annotations

import ast
import inspect
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from pydantic import Field

from llmforge import __version__
from llmforge.plugin import Component, Document, OptionsError, StrictModel, hookimpl
from llmforge.registry.components import KINDS, RegistryError
from llmforge.registry.errors import PluginError, plugin_failure, report
from llmforge.registry.manager import AUTOLOAD_ENV, DISABLE_ENV, api_mismatch, build_registry
from llmforge.registry.protocols import FACTORY_KEYWORDS, FACTORY_OPTIONAL_KEYWORDS, FACTORY_PROTOCOLS
from llmforge.spec.errors import SpecError, UserError
from llmforge.spec.load import load_spec
from llmforge.spec.validate import validate_loaded
from llmforge.testing import TINY_SPEC, run_spec

ROOT = Path(__file__).resolve().parents[3]
PACKAGE = ROOT / "llmforge"


@pytest.fixture
def no_autoload(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(AUTOLOAD_ENV, "1")


class Options(StrictModel):
    """A throwaway component's options."""

    lr: float = Field(0.1, gt=0, description="Learning rate.")
    fail: str | None = Field(None, description="What the factory raises: value, options, user, validation.")


def raising_factory(options: Options, **runtime):
    if options.fail == "value":
        raise ValueError("no such thing")
    if options.fail == "options":
        raise OptionsError("lr 0.1 is too large for this data", "lower lr")
    if options.fail == "user":
        raise UserError("data file missing")
    if options.fail == "validation":
        Options(lr=-1)
    return lambda step: options.lr / (step + 1)


def plain_strings(options: Options, *, context) -> list:
    return [Document("fine", "a:1"), "not a document"]


class Throwaway:
    @hookimpl
    def register_lr_schedules(self) -> list[Component]:
        return [Component("fancy_schedule", Options, raising_factory, "for tests")]

    @hookimpl
    def register_sources(self) -> list[Component]:
        return [Component("strings", Options, plain_strings, "yields str")]


# --- the module and the factory contract ---------------------------------------------------


def test_llmforge_plugin_imports_no_torch():
    code = "import sys, llmforge.plugin as p; p.Component; assert 'torch' not in sys.modules, 'torch'; print(p.API_VERSION)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "1.1", proc.stderr


def test_every_protocol_declares_its_kinds_keywords():
    for kind, protocol in FACTORY_PROTOCOLS.items():
        params = inspect.signature(protocol.__call__).parameters.values()
        assert tuple(p.name for p in params if p.kind is p.KEYWORD_ONLY) == FACTORY_KEYWORDS[kind], kind
    assert set(FACTORY_KEYWORDS) == set(KINDS)


def test_every_builtin_factory_accepts_its_kinds_keywords(no_autoload):
    registry = build_registry()
    for kind in KINDS:
        for name in registry.names(kind):
            factory = registry.factory(kind, name)
            target = factory.__init__ if inspect.isclass(factory) else factory
            bound = inspect.signature(target).bind(*(() if target is factory else (None,)), None,
                                                  **{k: None for k in FACTORY_KEYWORDS[kind]})
            assert bound, (kind, name)


def _build_calls() -> list[tuple[str, ast.Call]]:
    calls = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "build"
                    and node.args and isinstance(node.args[0], ast.Constant) and node.args[0].value in KINDS):
                calls.append((f"{path.relative_to(ROOT)}:{node.lineno}", node))
    return calls


def test_llmforge_calls_each_factory_with_the_options_then_its_kinds_keywords():
    calls = _build_calls()
    assert {node.args[0].value for _, node in calls} == set(KINDS)
    for where, node in calls:
        kind = node.args[0].value
        assert len(node.args) == 2, f"{where}: a factory gets its options as the only positional argument"
        given = [k.arg for k in node.keywords if k.arg is not None]
        assert tuple(sorted(given)) == tuple(sorted(FACTORY_KEYWORDS[kind])), where
        # `**extra` only for a kind with optional keywords, which the call must build from those names alone.
        assert all(k.arg is not None for k in node.keywords) or kind in FACTORY_OPTIONAL_KEYWORDS, where


def test_factories_written_to_the_protocols_build_keyword_only_or_not(no_autoload):
    seen = {}

    def keyword_only(options, *, parallelism, precision, seed):
        seen["keyword"] = (parallelism, precision, seed)
        return ["chunk"]

    def positional(options, parallelism, precision, seed):
        seen["positional"] = (parallelism, precision, seed)
        return ["chunk"]

    class Models:
        @hookimpl
        def register_models(self) -> list[Component]:
            return [Component("kw_model", Options, keyword_only), Component("pos_model", Options, positional)]

    registry = build_registry([(Models(), "models-dist", "1")])
    for name in ("kw_model", "pos_model"):
        options = registry.get("model", name).typed_options(name=name)
        assert registry.build("model", options, parallelism="P", precision="fp32", seed=3) == ["chunk"]
    assert seen == {"keyword": ("P", "fp32", 3), "positional": ("P", "fp32", 3)}


# --- errors from plugin code ----------------------------------------------------------------


@pytest.mark.parametrize(("fail", "code", "words"), [
    ("value", 1, "ValueError: no such thing"),
    ("options", 2, "OptionsError: lr 0.1 is too large for this data; hint: lower lr"),
    ("user", 2, "UserError: data file missing"),
    ("validation", 2, "ValidationError: lr: Input should be greater than 0"),
])
def test_a_factory_that_raises_is_one_line_naming_the_component(no_autoload, fail, code, words):
    registry = build_registry([(Throwaway(), "throwaway-dist", "0.3")])
    options = registry.get("lr_schedule", "fancy_schedule").typed_options(name="fancy_schedule", fail=fail)
    with pytest.raises(PluginError) as e:
        registry.build("lr_schedule", options, peak_lr=1.0, total_steps=10)
    assert e.value.line == f"lr_schedule 'fancy_schedule' (throwaway-dist 0.3) failed while being built: {words}"
    assert e.value.exit_code == code


def test_an_error_while_a_plugin_component_runs_is_traced_to_it(no_autoload, tmp_path, capsys):
    registry = build_registry([(Throwaway(), "throwaway-dist", "0.3")])
    schedule = registry.build("lr_schedule", registry.get("lr_schedule", "fancy_schedule").typed_options(name="fancy_schedule"),
                              peak_lr=1.0, total_steps=10)
    with pytest.raises(ZeroDivisionError) as e:
        schedule(-1)
    failure = plugin_failure(e.value, registry)
    assert failure.line == "lr_schedule 'fancy_schedule' (throwaway-dist 0.3) failed while running: ZeroDivisionError: float division by zero"
    (tmp_path / "run.log").write_text("")
    assert report(failure, tmp_path / "run.log") == 1
    assert capsys.readouterr().err == f"error: {failure.line} (traceback in {tmp_path / 'run.log'})\n"
    assert "Traceback (most recent call last)" in (tmp_path / "run.log").read_text()
    namespace = {"__name__": "llmforge.runtime.somewhere"}
    exec("def boom():\n    raise KeyError('a bug of llmforge itself')", namespace)
    try:
        namespace["boom"]()
    except KeyError as own:
        own.__traceback__ = own.__traceback__.tb_next  # from where llmforge raised it, as the CLI sees it
        assert plugin_failure(own, registry) is None


def test_a_source_that_yields_a_plain_string_is_refused_naming_it(no_autoload):
    registry = build_registry([(Throwaway(), "throwaway-dist", "0.3")])
    docs = registry.build("source", registry.get("source", "strings").typed_options(name="strings"), context=None)
    with pytest.raises(PluginError) as e:
        list(docs)
    assert e.value.line == ("source 'strings' (throwaway-dist 0.3) failed while running: TypeError: yielded str 'not a document'; "
                            "a source yields llmforge.plugin.Document(content, origin) objects")
    assert e.value.exit_code == 1


# --- what the registry refuses -------------------------------------------------------------


@pytest.mark.parametrize(("component", "words"), [
    (Component("bad_opt", StrictModel, None), "optimizer 'bad_opt' (odd-dist 1): its options have no `lr` field"),
    (Component("bad_eval", Options, None, metrics=("accuracy", "step")),
     "evaluator 'bad_eval' (odd-dist 1) declares the metric key(s) step, which the metrics row reserves"),
    (Component("bad_need", Options, None, needs=frozenset({"gpu"})), "evaluator 'bad_need' (odd-dist 1) needs gpu, which no stage offers"),
])
def test_the_registry_refuses_a_broken_contract_naming_the_component(no_autoload, component, words):
    kind = "optimizer" if component.name == "bad_opt" else "evaluator"

    class Odd:
        @hookimpl
        def register_optimizers(self) -> list[Component]:
            return [component] if kind == "optimizer" else []

        @hookimpl
        def register_evaluators(self) -> list[Component]:
            return [component] if kind == "evaluator" else []

    with pytest.raises(RegistryError, match=words.replace("(", r"\(").replace(")", r"\)")):
        build_registry([(Odd(), "odd-dist", "1")])


class Evaluators:
    @hookimpl
    def register_evaluators(self) -> list[Component]:
        return [
            Component("loss_too", Options, None, metrics=("val_loss",)),
            Component("needs_logprobs", Options, None, needs=frozenset({"logprobs"})),
            Component("needs_val", Options, None, needs=frozenset({"val_split"})),
            Component("echo", Options, None),
        ]


@pytest.mark.parametrize(("overrides", "path", "words"), [
    (["stages.1.evaluators=[{name: val_loss}, {name: loss_too}]"], ("stages", 1, "evaluators", 1, "name"),
     "the loss_too evaluator returns the metric 'val_loss', which stages[1].evaluators[0] (val_loss) returns too"),
    (["stages.1.evaluators=[{name: needs_logprobs}]"], ("stages", 1, "evaluators", 0, "name"),
     "the needs_logprobs evaluator needs logprobs, which a pretrain stage does not offer"),
    (["data.split.val_fraction=0", "stages.1.evaluators=[{name: needs_val}]"], ("data", "split", "val_fraction"),
     "lists the needs_val evaluator (evaluators[0]), which reads it"),
])
def test_validate_applies_what_a_plugin_evaluator_declares(no_autoload, overrides, path, words):
    registry = build_registry([(Evaluators(), "eval-dist", "2")])
    with pytest.raises(SpecError) as e:
        validate_loaded(load_spec(TINY_SPEC, overrides), registry)
    [issue] = e.value.issues
    assert issue.path == path and words in issue.message


def test_an_eval_row_keeps_reserved_declared_and_first_values(no_autoload):
    from llmforge.runtime.evaluate import MetricKeys

    registry = build_registry([(Evaluators(), "eval-dist", "2")])
    spec = validate_loaded(load_spec(TINY_SPEC, ["stages.1.evaluators=[{name: val_loss}, {name: needs_val}, {name: echo}]"]), registry)
    lines: list[str] = []
    keep = MetricKeys(spec.stages[1], registry, lines.append)
    for _ in range(2):  # each warning once per stage, however many evaluations
        row: dict = {}
        keep.add(row, 0, {"val_loss": 2.0, "val_ppl": 7.4})
        keep.add(row, 1, {"step": 99, "val_loss": 0.0, "accuracy": 0.5})
        keep.add(row, 2, {"accuracy": 0.9})
        assert row == {"val_loss": 2.0, "val_ppl": 7.4, "accuracy": 0.5}
    val_loss, needs_val = f"'val_loss' (llmforge {__version__})", "'needs_val' (eval-dist 2)"
    assert lines == [
        f"[pretrain] warning: evaluator {needs_val} returned 'step', a key every metrics row reserves; dropped (rename it in the plugin)",
        f"[pretrain] warning: evaluator {needs_val} returned 'val_loss', which evaluator {val_loss} declares; {needs_val}'s value dropped",
        f"[pretrain] warning: evaluators {needs_val} and 'echo' (eval-dist 2) both returned 'accuracy'; the row keeps {needs_val}'s",
    ]


# --- loading plugins: switches, names, API versions ----------------------------------------

OPTIMIZER_PLUGIN = """
from pydantic import Field
from llmforge.plugin import Component, StrictModel, hookimpl
{api}
class Options(StrictModel):
    lr: float = Field(0.1, gt=0, description="Learning rate.")

@hookimpl
def register_optimizers():
    return [Component({name!r}, Options, {factory!r}, "a fake optimizer")]
"""


def optimizer_plugin(name: str, factory: str | None = None, api: str = "") -> str:
    return OPTIMIZER_PLUGIN.format(name=name, factory=factory, api=api)


def test_one_plugin_is_switched_off_by_distribution_or_entry_point_name(fake_dist, cli, monkeypatch):
    fake_dist("plugin-one", "1.0", optimizer_plugin("lion2"))
    fake_dist("plugin-two", "3.1", optimizer_plugin("lion2"))
    code, _, err = cli("plugins")
    assert code == 2 and "uninstall one of them, rename the component, or switch one off with LLMFORGE_DISABLE_PLUGINS=plugin-two" in err
    for off in ("plugin-two", "plugin_two", "other,plugin-two"):
        monkeypatch.setenv(DISABLE_ENV, off)
        code, out, _ = cli("plugins", "--json")
        assert code == 0 and [r["provider"] for r in json.loads(out) if r["name"] == "lion2"] == ["plugin-one"]


def test_a_clash_with_a_built_in_says_to_rename_the_plugins_component(fake_dist, cli):
    fake_dist("copycat", "0.1", optimizer_plugin("adamw"))
    code, _, err = cli("validate", TINY_SPEC)
    assert code == 2
    assert f"optimizer 'adamw' is registered twice: by llmforge {__version__} and by copycat 0.1; 'adamw' is a built-in name: " \
           "the plugin must rename its component" in err


def test_api_versions():
    assert api_mismatch(">=1,<2") is None and api_mismatch("==1") is None and api_mismatch(">=1.0") is None
    assert api_mismatch("!=1") is not None and api_mismatch("!=1.0") is None  # "==1" / "!=1": any 1.x
    assert api_mismatch("==1.0") == "it needs the llmforge plugin API ==1.0, and this llmforge speaks 1.1"
    assert api_mismatch(">=2") == "it needs the llmforge plugin API >=2, and this llmforge speaks 1.1"
    assert api_mismatch("<1") is not None and "is not a version range" in api_mismatch("one")


def test_a_plugin_for_another_api_or_broken_is_named_when_a_spec_needs_it(fake_dist, cli):
    fake_dist("future-plugin", "9.0", optimizer_plugin("warp", api='LLMFORGE_API = ">=2,<3"'))
    fake_dist("broken-plugin", "0.3", "import a_module_that_is_not_installed\n")
    code, _, err = cli("validate", TINY_SPEC, "stages.1.train.optimizer={name: warp}")
    assert code == 2
    assert ("warning: plugin future-plugin 9.0 (entry point 'future-plugin' = " in err
            and "is refused: it needs the llmforge plugin API >=2,<3, and this llmforge speaks 1.1; switch it off with "
                "LLMFORGE_DISABLE_PLUGINS=future-plugin" in err)
    assert "; plugin broken-plugin 0.3 (entry point" in err and "failed to import: ModuleNotFoundError" in err
    assert "it is installed but not loaded, and may be the one that provides it" in err
    assert "hint: pick a registered optimizer, or repair the plugin that is installed but not loaded" in err


def test_plugins_check_imports_every_factory_and_schema_names_the_provider(fake_dist, cli):
    fake_dist("plugin-one", "1.0", optimizer_plugin("lion2", factory="no_such_module_xyz:build"))
    code, _, err = cli("plugins", "--check")
    assert code == 2
    assert "error: optimizer 'lion2' from plugin-one: cannot import its factory 'no_such_module_xyz:build'" in err
    code, out, _ = cli("schema")
    assert code == 0 and "From the plugin plugin-one 1.0." in out


def test_plugins_json_into_a_closed_pipe_ends_quietly(monkeypatch, no_autoload):
    from llmforge.cli import main

    read, write = os.pipe()
    os.close(read)
    with os.fdopen(write, "w") as closed:
        monkeypatch.setattr(sys, "stdout", closed)
        assert main(["plugins", "--json"]) == 0


# --- extends swaps a component -------------------------------------------------------------


class Fancy:
    @hookimpl
    def register_optimizers(self) -> list[Component]:
        return [Component("fancy", Options, None, "for tests")]

    @hookimpl
    def register_sources(self) -> list[Component]:
        return [Component("fancy_source", Options, None, "for tests")]


def test_extends_swaps_a_built_in_optimizer_and_source_for_a_plugins(no_autoload, tmp_path):
    registry = build_registry([(Fancy(), "fancy-dist", "1")])
    base = load_spec(TINY_SPEC, []).data
    stages = base["stages"]
    stages[1]["train"]["optimizer"] = {"name": "fancy", "lr": 0.5}
    child = tmp_path / "child.yaml"
    child.write_text(f"extends: {TINY_SPEC}\ndata:\n  sources:\n    sums: {{name: fancy_source}}\nstages: {json.dumps(stages)}\n")
    assert base["data"]["sources"]["sums"]["num_examples"] == 400  # a tasks option fancy_source would refuse
    spec = validate_loaded(load_spec(child, []), registry)
    assert spec.stages[1].train.optimizer.model_dump() == {"name": "fancy", "lr": 0.5, "fail": None}
    assert spec.data.sources["sums"].model_dump() == {"name": "fancy_source", "lr": 0.1, "fail": None}


# --- a run with a misbehaving plugin -------------------------------------------------------

MISBEHAVING = """
from pydantic import Field
from llmforge.plugin import Component, StrictModel, hookimpl

class Options(StrictModel):
    lr: float = Field(0.1, gt=0, description="Learning rate.")

@hookimpl
def register_evaluators():
    return [Component("greedy_keys", Options, "{module}_impl:build_greedy", "returns keys it should not"),
            Component("flaky", Options, "{module}_impl:build_flaky", "raises at step 2")]

@hookimpl
def register_optimizers():
    return [Component("broken_opt", Options, "{module}_impl:build_optimizer", "raises when built")]
"""

MISBEHAVING_IMPL = """
class Greedy:
    def evaluate(self, step):
        return {"step": 999, "val_loss": -1.0, "greedy": 1.0}

class Flaky:
    def __init__(self, context):
        self.context = context

    def evaluate(self, step):
        if step == 2:
            raise ValueError("flaky at 2")
        return {"flaky_batches": float(len(self.context.val_batches(1)[0].tokens))}

def build_greedy(options, *, context):
    return Greedy()

def build_flaky(options, *, context):
    return Flaky(context)

def build_optimizer(options, *, params):
    raise ValueError("cannot build this")
"""


@pytest.fixture
def misbehaving(fake_dist, tmp_path) -> dict[str, str]:
    module = fake_dist("misbehaving-plugin", "0.2", "")
    site = tmp_path / "site"  # where fake_dist installs
    (site / f"{module}.py").write_text(textwrap.dedent(MISBEHAVING).replace("{module}", module))
    (site / f"{module}_impl.py").write_text(textwrap.dedent(MISBEHAVING_IMPL))
    return {k: v for k, v in os.environ.items() if k != AUTOLOAD_ENV} | {"PYTHONPATH": str(site)}


@pytest.mark.slow
def test_a_run_keeps_going_past_a_misbehaving_evaluator(misbehaving, tmp_path):
    run_dir = tmp_path / "run"
    rows = run_spec(["stages.1.evaluators=[{name: val_loss}, {name: greedy_keys}, {name: flaky}]"], run_dir=run_dir, env=misbehaving)
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [2, 4] and all(r["val_loss"] > 0 and r["greedy"] == 1.0 for r in evals)
    assert "flaky_batches" not in evals[0] and evals[1]["flaky_batches"] == 8.0  # one whole global batch
    log = (run_dir / "run.log").read_text()
    assert log.count("'greedy_keys' (misbehaving-plugin 0.2) returned 'step', a key every metrics row reserves") == 1
    assert log.count("returned 'val_loss', which evaluator 'val_loss'") == 1
    assert "step 2: evaluator 'flaky' (misbehaving-plugin 0.2) failed: ValueError: flaky at 2; training continues" in log
    assert 'raise ValueError("flaky at 2")' in log


@pytest.mark.slow
def test_a_plugin_factory_that_raises_ends_the_run_with_one_line(misbehaving, tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "llmforge.cli", "run", str(TINY_SPEC), "stages.1.train.optimizer={name: broken_opt}",
                           "--run-dir", str(run_dir)], capture_output=True, text=True, env=misbehaving, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stderr.strip() == (f"error: optimizer 'broken_opt' (misbehaving-plugin 0.2) failed while being built: ValueError: "
                                   f"cannot build this (traceback in {run_dir / 'run.log'})")
    assert 'raise ValueError("cannot build this")' in (run_dir / "run.log").read_text()
