"""Cross-field checks of the `lm_eval` evaluator (lm-evaluation-harness inside a stage).

What the evaluator would refuse when its stage starts, `validate` refuses first: a stage whose
requests it cannot serve as the model trains (prompt tuning's soft prompt is not applied to
harness requests; experts split over ranks need every forward in step), and, with the input
files, a missing lm-evaluation-harness (looked up with `find_spec`, never imported here: a fact
of the machine, as TransformerEngine's is), include paths that are not folders, and task names
the include paths do not define (read with the harness's own index, which imports no torch).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator

from llmforge.spec.checks import Sections, _issue, check
from llmforge.spec.components import LM_EVAL_EXTRA
from llmforge.spec.errors import SpecIssue, did_you_mean
from llmforge.spec.load import LoadedSpec

NAME = "lm_eval"


def _harness_evaluators(s: Sections) -> Iterator[tuple[int, int, object, object]]:
    for i, stage in enumerate(s["stages"]):
        for j, ev in enumerate(getattr(stage, "evaluators", None) or ()):
            if getattr(ev, "name", None) == NAME:
                yield i, j, stage, ev


@check("stages")
def _lm_eval_sees_the_stage_model(s: Sections, loaded: LoadedSpec) -> Iterator[SpecIssue]:
    """A prompt_tuning stage's model is its soft prompt plus the frozen weights; harness requests would skip the prompt."""
    for i, j, stage, _ in _harness_evaluators(s):
        if stage.type == "prompt_tuning":
            yield _issue(loaded, ("stages", i, "evaluators", j, "name"),
                         "the lm_eval evaluator does not apply a prompt_tuning stage's soft prompt to the harness's requests",
                         f"remove it from stages[{i}].evaluators and evaluate the stage's checkpoints with `llmforge eval RUN_DIR "
                         f"--stage {stage.name}` (which puts the soft prompt before every request)")


@check("stages", "parallelism")
def _lm_eval_without_split_experts(s: Sections, loaded: LoadedSpec) -> Iterator[SpecIssue]:
    """Each data-parallel replica serves its own requests; experts split over replicas need every forward together."""
    ep = s["parallelism"].expert_model_parallel_size
    if ep == 1:
        return
    for i, j, _, _ in _harness_evaluators(s):
        yield _issue(loaded, ("stages", i, "evaluators", j, "name"),
                     f"the lm_eval evaluator cannot run with experts split over {ep} ranks (parallelism.expert_model_parallel_size): "
                     "each replica serves its own requests, and an expert-parallel group runs every forward together",
                     f"remove it from stages[{i}].evaluators and evaluate the checkpoints with `llmforge eval` at "
                     "parallelism.expert_model_parallel_size=1")


def input_issues(s: Sections, loaded: LoadedSpec) -> Iterator[SpecIssue]:
    """The machine and the files: lm-evaluation-harness installed, include paths are folders, task names found there."""
    if "stages" not in s:
        return
    found = list(_harness_evaluators(s))
    if found and importlib.util.find_spec("lm_eval") is None:
        for i, j, _, _ in found:
            yield _issue(loaded, ("stages", i, "evaluators", j, "name"),
                         "the lm_eval evaluator needs lm-evaluation-harness, which is not installed", LM_EVAL_EXTRA)
        return
    for i, j, _, ev in found:
        where = ("stages", i, "evaluators", j)
        folders = [os.path.abspath(os.path.expanduser(p)) for p in ev.include_path]
        missing = [k for k, p in enumerate(folders) if not os.path.isdir(p)]
        for k in missing:
            yield _issue(loaded, (*where, "include_path", k), f"include path {ev.include_path[k]!r} is not a directory",
                         "give folders of task YAMLs (relative paths resolve against the current directory), or pass --skip-inputs")
        if missing or not folders:
            continue  # the harness's own tasks: their index takes ~10 s to build, so their names are checked when the stage starts
        from lm_eval.tasks import TaskManager

        known = TaskManager(include_path=folders, include_defaults=False).all_tasks
        for k, name in enumerate(ev.tasks):
            if name not in known and not os.path.isfile(os.path.expanduser(name)):
                guess = did_you_mean(name, known)
                yield _issue(loaded, (*where, "tasks", k), f"no task, group or tag {name!r} in the include path(s) {', '.join(ev.include_path)}",
                             f"did you mean {guess!r}?" if guess else f"known there: {', '.join(known[:12]) or 'none'}")
