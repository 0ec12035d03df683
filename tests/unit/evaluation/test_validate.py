"""`validate` refuses what the lm_eval evaluator would refuse when its stage starts, at the evaluator's keys:
lm-evaluation-harness missing (naming the extra), include paths that are not folders, task names the include
paths do not define, a prompt_tuning stage, experts split over ranks; `--skip-inputs` skips the machine and files."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from llmforge.spec.errors import SpecError
from llmforge.testing import validate_spec

TASKS_DIR = Path(__file__).resolve().parents[3] / "examples" / "eval_tasks"


def evaluator(**fields: str) -> str:
    body = ", ".join(f"{k}: {v}" for k, v in {"name": "lm_eval", "tasks": "[llmforge_add2]", "include_path": f"[{TASKS_DIR}]", **fields}.items())
    return f"stages.1.evaluators=[{{name: val_loss}}, {{{body}}}]"


def without_inputs(*overrides: str):
    """`validate --skip-inputs`: the spec alone."""
    from llmforge.registry.manager import build_registry
    from llmforge.spec.load import load_spec
    from llmforge.spec.validate import validate_loaded
    from llmforge.testing import TINY_SPEC

    return validate_loaded(load_spec(str(TINY_SPEC), list(overrides)), build_registry([]), check_inputs=False)


def issues(*overrides: str, check_inputs: bool = True) -> list:
    with pytest.raises(SpecError) as e:
        validate_spec(list(overrides)) if check_inputs else without_inputs(*overrides)
    return e.value.issues


def test_a_spec_with_the_evaluator_and_local_tasks_is_valid():
    pytest.importorskip("lm_eval")
    spec = validate_spec([evaluator(limit="8", num_fewshot="2")])
    [_, options] = spec.stages[1].evaluators
    assert (options.name, options.tasks, options.limit, options.num_fewshot) == ("lm_eval", ["llmforge_add2"], 8.0, 2)


def test_missing_harness_names_the_extra(monkeypatch):
    from llmforge.spec import checks_lm_eval

    real = importlib.util.find_spec
    monkeypatch.setattr(checks_lm_eval.importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    [issue] = issues(evaluator())
    assert issue.path == ("stages", 1, "evaluators", 1, "name")
    assert "needs lm-evaluation-harness, which is not installed" in issue.message and 'pip install -e ".[eval]"' in issue.hint


def test_include_paths_and_task_names_are_checked_with_the_inputs(tmp_path):
    pytest.importorskip("lm_eval")
    [issue] = issues(evaluator(include_path=f"[{TASKS_DIR}, {tmp_path / 'none'}]"))
    assert issue.path == ("stages", 1, "evaluators", 1, "include_path", 1) and "is not a directory" in issue.message
    [issue] = issues(evaluator(tasks="[llmforge_add2_mc, llmforge_add2_gem]"))
    assert issue.path == ("stages", 1, "evaluators", 1, "tasks", 1)
    assert "no task, group or tag 'llmforge_add2_gem'" in issue.message and issue.hint == "did you mean 'llmforge_add2_gen'?"
    without_inputs(evaluator(tasks="[nothing]", include_path=f"[{tmp_path / 'none'}]"))  # a spec for another machine: neither is read


def test_stages_the_evaluator_cannot_serve_are_refused():
    [issue] = issues("parallelism.expert_model_parallel_size=2", "parallelism.nproc_per_node=2", "model.num_moe_experts=4",
                     "model.add_bias_linear=false", evaluator())
    assert issue.path == ("stages", 1, "evaluators", 1, "name") and "experts split over 2 ranks" in issue.message
    tuning = ("stages.1={name: tune, type: prompt_tuning, init_from: runs/base/checkpoints/pretrain/step-1, "
              "data: {sources: {add: {name: tasks}}}, max_seq_length: 16, prompt_tuning: {num_virtual_tokens: 4}, "
              "train: {micro_batch_size: 2, global_batch_size: 4, max_steps: 1}, "
              f"evaluators: [{{name: lm_eval, tasks: [llmforge_add2], include_path: [{TASKS_DIR}]}}]}}")
    [issue] = issues(tuning, check_inputs=False)
    assert issue.path == ("stages", 1, "evaluators", 0, "name") and "soft prompt" in issue.message
    assert "llmforge eval RUN_DIR --stage tune" in issue.hint


def test_options_are_strict():
    [issue] = issues(evaluator(taks="[x]"), check_inputs=False)
    assert issue.path[-1] == "taks"
    [issue] = issues(evaluator(limit="0"), check_inputs=False)
    assert issue.path[-1] == "limit"


@pytest.mark.slow
def test_validating_the_evaluator_imports_no_torch():
    """validate reads the include paths with the harness's own index, which needs no torch (nor does the extra check)."""
    pytest.importorskip("lm_eval")
    from tests.unit.test_import_time import HEAVY, imported_modules
    from llmforge.testing import TINY_SPEC

    modules = imported_modules(["validate", str(TINY_SPEC), evaluator()])
    assert "lm_eval.tasks" in modules  # the task names really were checked
    assert not sorted({m for m in modules if m.split(".")[0] in HEAVY})
