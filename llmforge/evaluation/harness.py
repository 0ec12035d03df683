"""Tasks, one run of lm-evaluation-harness, and what comes out of it: what `llmforge eval` and the
`lm_eval` evaluator share.

Tasks are found by the harness's own `TaskManager`, built over only the given folders when there
are any (the harness's index of its ~15,000 own tasks takes ~10 s to build, and their data come
from the Hugging Face Hub). Local tasks read files with the harness's `dataset_path: json` (or csv,
parquet, ...) and `data_files`; `datasets` resolves a relative path against the current directory,
so here a relative path means the task YAML's own folder, and shipped tasks work from anywhere.

`run` does what the harness's `simple_evaluate` does before and after `evaluate` (its seeds, the
few-shot overrides, the few-shot seed), without the environment report it gathers on the way out
(`pip list` and friends: ~5 s per call, at every evaluation of a training stage).
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llmforge.spec.components import LM_EVAL_EXTRA
from llmforge.spec.errors import UserError, did_you_mean

# `datasets` builders whose inputs are files: their relative paths are resolved against the task YAML.
FILE_BUILDERS = frozenset({"json", "csv", "parquet", "text", "arrow", "pandas"})


def require_lm_eval() -> None:
    """Refuse, naming the extra, when lm-evaluation-harness is not installed."""
    if importlib.util.find_spec("lm_eval") is None:
        raise UserError("lm-evaluation-harness is not installed", LM_EVAL_EXTRA)


def _absolute(path: Any, folder: Path) -> Any:
    if not isinstance(path, str) or "://" in path:
        return path
    path = os.path.expanduser(path)
    return path if os.path.isabs(path) else str(folder / path)


def local_files(config: dict[str, Any], folder: Path) -> dict[str, Any]:
    """A task config whose relative `data_files` (and `data_dir`) of a file builder are made absolute against `folder`."""
    if config.get("dataset_path") not in FILE_BUILDERS:
        return config
    kwargs = dict(config.get("dataset_kwargs") or {})
    files = kwargs.get("data_files")
    if isinstance(files, dict):
        kwargs["data_files"] = {split: [_absolute(p, folder) for p in v] if isinstance(v, list) else _absolute(v, folder)
                                for split, v in files.items()}
    elif isinstance(files, list):
        kwargs["data_files"] = [_absolute(p, folder) for p in files]
    elif files is not None:
        kwargs["data_files"] = _absolute(files, folder)
    if "data_dir" in kwargs:
        kwargs["data_dir"] = _absolute(kwargs["data_dir"], folder)
    return {**config, "dataset_kwargs": kwargs}


def _local_files_factory():
    from lm_eval.tasks._factory import TaskFactory

    class LocalFilesFactory(TaskFactory):
        """The harness's task factory, with each task YAML's relative data files resolved against its folder."""

        def _load_full_config(self, entry, overrides=None):
            config = super()._load_full_config(entry, overrides)
            return local_files(config, Path(entry.yaml_path).parent) if entry.yaml_path else config

    return LocalFilesFactory


def folders(include_path: Sequence[str]) -> list[Path]:
    """The include paths as absolute folders, each refused by name when it is not one."""
    out = []
    for given in include_path:
        path = Path(given).expanduser().resolve()
        if not path.is_dir():
            raise UserError(f"include path {given} is not a directory", "give folders of task YAMLs (e.g. examples/eval_tasks)")
        out.append(path)
    return out


def task_manager(include_path: Sequence[str] = ()):
    """The harness's `TaskManager` over only `include_path` (none: the harness's own tasks), local data files resolved."""
    from lm_eval.tasks import TaskManager

    found = folders(include_path)
    manager = TaskManager(include_path=[str(p) for p in found] or None, include_defaults=not found)
    manager._factory = _local_files_factory()(meta=None)  # the harness has no public hook for this (pinned < 0.5)
    return manager


def check_tasks(manager, names: Sequence[str], include_path: Sequence[str] = ()) -> None:
    """Refuse a name that is neither a task, group or tag the manager knows nor a task YAML file."""
    known = manager.all_tasks
    for name in names:
        if name in known or Path(name).expanduser().is_file():
            continue
        where = f"the include path(s) {', '.join(include_path)}" if include_path else "the harness's own tasks"
        guess = did_you_mean(name, known)
        listed = ", ".join(known[:12]) + (", ..." if len(known) > 12 else "")
        raise UserError(f"no task, group or tag {name!r} in {where}",
                        f"did you mean {guess!r}?" if guess else (f"known there: {listed}" if include_path and known else
                                                                  "check the name, or give --include-path with your task YAMLs"))


def run(lm, manager, *, tasks: Sequence[str], num_fewshot: int | None = None, limit: float | None = None,
        apply_chat_template: bool = False, system_instruction: str | None = None, log_samples: bool = False,
        bootstrap_iters: int = 100000) -> dict[str, Any] | None:
    """The harness's results for `tasks` with `lm` (rank 0 of the data-parallel replicas; None elsewhere).

    Args:
        limit: documents per task (a fraction of each task below 1), as `lm_eval --limit`.
    """
    import random

    import numpy as np
    from lm_eval.defaults import DEFAULT_OTHER_SEED, DEFAULT_RANDOM_SEED
    from lm_eval.evaluator import evaluate
    from lm_eval.utils import set_torch_seed

    if apply_chat_template and not lm.chat_template(True):
        raise UserError("apply_chat_template needs the tokenizer's own chat template, and this tokenizer has none",
                        "evaluate without it, or with a tokenizer that has one (chat_template.jinja or tokenizer_config.json's chat_template)")
    # simple_evaluate's seeds: the same few-shot examples and the same sampled answers as `lm_eval` picks.
    random.seed(DEFAULT_RANDOM_SEED)
    np.random.seed(DEFAULT_OTHER_SEED)
    set_torch_seed(DEFAULT_OTHER_SEED)
    loaded = manager.load(list(tasks))
    for task in loaded["tasks"].values():
        if num_fewshot is not None:
            if task.get_config("num_fewshot") != 0:  # a task that says 0 keeps it, as in simple_evaluate
                task.set_config(key="num_fewshot", value=num_fewshot)
        elif task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)
        task.set_fewshot_seed(seed=DEFAULT_OTHER_SEED)
    count = None if limit is None else (limit if limit < 1 else int(limit))
    started = time.time()
    results = evaluate(lm=lm, task_dict=loaded, limit=count, bootstrap_iters=bootstrap_iters, log_samples=log_samples,
                       system_instruction=system_instruction, apply_chat_template=apply_chat_template,
                       fewshot_as_multiturn=apply_chat_template)
    if results is None:
        return None
    from llmforge import __version__

    results["config"] = {"model": "llmforge", "batch_size": lm.batch_size, "limit": limit, "num_fewshot": num_fewshot,
                         "bootstrap_iters": bootstrap_iters, "apply_chat_template": apply_chat_template,
                         "system_instruction": system_instruction, "random_seed": DEFAULT_RANDOM_SEED,
                         "numpy_seed": DEFAULT_OTHER_SEED, "torch_seed": DEFAULT_OTHER_SEED, "fewshot_seed": DEFAULT_OTHER_SEED}
    results["date"] = started
    results["lm_eval_version"], results["llmforge_version"] = _version("lm_eval"), __version__
    return results


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


def metrics(results: dict[str, Any]) -> dict[str, float]:
    """The results as eval-row keys: `<task>/<metric>` (filter `none`) or `<task>/<metric>/<filter>`, groups included, stderrs left out."""
    out: dict[str, float] = {}
    for section in ("results", "groups"):
        for task, row in (results.get(section) or {}).items():
            for key, value in row.items():
                metric, sep, kind = key.partition(",")
                if not sep or metric.endswith("_stderr") or isinstance(value, bool) or not isinstance(value, (int, float)):
                    continue
                out[f"{task}/{metric}" if kind == "none" else f"{task}/{metric}/{kind}"] = float(value)
    return out


def write(results: dict[str, Any], path: Path) -> list[Path]:
    """results.json at `path` and, when the results hold samples, samples_<task>.jsonl beside it; each written atomically."""
    from lm_eval.utils import handle_non_serializable

    from llmforge.atomic import atomic_write_text

    results = dict(results)
    samples = results.pop("samples", None) or {}
    path.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for task, rows in samples.items():
        target = path.parent / f"samples_{task}.jsonl"
        atomic_write_text(target, "".join(json.dumps(r, default=handle_non_serializable, ensure_ascii=False) + "\n" for r in rows))
        written.append(target)
    atomic_write_text(path, json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False) + "\n")
    return [path, *written]


def table(results: dict[str, Any]):
    """The harness's results table (its columns), as a rich Table."""
    from rich.table import Table

    out = Table(show_edge=False, header_style="bold")
    for column in ("Task", "Filter", "n-shot", "Metric", "Value", "± Stderr"):
        out.add_column(column, justify="right" if column in ("n-shot", "Value", "± Stderr") else "left",
                       no_wrap=column in ("Task", "Metric", "Value"))
    for section in ("results", "groups"):
        for task, row in (results.get(section) or {}).items():
            if section == "groups" and task in (results.get("results") or {}):
                continue
            shots = results.get("n-shot", {}).get(task, "")
            for key, value in row.items():
                metric, sep, kind = key.partition(",")
                if not sep or metric.endswith("_stderr") or not isinstance(value, (int, float)):
                    continue
                stderr = row.get(f"{metric}_stderr,{kind}")
                out.add_row(row.get("alias", task), kind, str(shots), metric, _number(value),
                            _number(stderr) if isinstance(stderr, (int, float)) else "")
    return out


def _number(value: float) -> str:
    return f"{value:.4f}" if abs(value) < 1e5 else f"{value:.4g}"


def quiet() -> None:
    """The harness's per-task progress bars and `datasets`' off (llmforge eval draws one bar over requests).

    tqdm reads TQDM_DISABLE when it is first imported, so this runs before lm_eval is."""
    os.environ.setdefault("TQDM_DISABLE", "1")
    if importlib.util.find_spec("datasets") is not None:
        import datasets

        datasets.disable_progress_bars()
