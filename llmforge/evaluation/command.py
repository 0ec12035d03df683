"""`llmforge eval`: lm-evaluation-harness tasks on a checkpoint, at its layout, without converting it.

A run dir means the newest checkpoint of its last training stage (or `--stage`'s), evaluated at the
run's own tensor and pipeline sizes; a checkpoint dir (`<run>/checkpoints/<stage>/step-N`) at TP=1,
PP=1 unless `parallelism.KEY=VALUE` overrides say otherwise. `--nproc-per-node` adds data-parallel
replicas, which split the requests. Several processes relaunch the command under torchrun, as
`run` and `generate` do. Checkpoints load as `llmforge generate` loads them (`interop.generate`):
full ones, LoRA ones merged on load, prompt-tuning ones with their soft prompt before every request.

Results: the harness's results JSON in `<run>/eval/<stage>-step-N/results.json` (or `--output`),
with `samples_<task>.jsonl` beside it under `--log-samples`; an existing file is kept unless
`--overwrite`. Rank 0 prints the table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from llmforge.spec.errors import UserError

LAYOUT_KEYS = ("tensor_model_parallel_size", "pipeline_model_parallel_size", "virtual_pipeline_model_parallel_size")


def add_parser(sub: argparse._SubParsersAction, handler) -> None:
    p = sub.add_parser("eval", help="run lm-evaluation-harness tasks on a checkpoint, at its layout (no conversion)",
                       description="Evaluate a checkpoint with EleutherAI's lm-evaluation-harness (pip install -e \".[eval]\"). "
                                   "A run dir is evaluated at the run's tensor/pipeline sizes, a checkpoint dir at TP=1, PP=1; "
                                   "parallelism.KEY=VALUE overrides and --nproc-per-node change that (relaunched under torchrun). "
                                   "docs/evaluation.md has the details.")
    p.add_argument("source", metavar="RUN_DIR|CHECKPOINT", help="a run dir (its last stage's newest checkpoint) or a checkpoints/<stage>/step-N dir")
    p.add_argument("overrides", nargs="*", metavar="parallelism.KEY=VALUE",
                   help="the layout to evaluate at, e.g. parallelism.tensor_model_parallel_size=2 (any layout, whatever saved the checkpoint)")
    p.add_argument("--tasks", required=True, help="comma-separated harness task, group or tag names (or task YAML paths)")
    p.add_argument("--include-path", action="append", default=[], metavar="DIR",
                   help="a folder of task YAMLs (repeatable); given, tasks are looked up only there, e.g. examples/eval_tasks")
    p.add_argument("--num-fewshot", type=int, help="few-shot examples per prompt (default: each task's own)")
    p.add_argument("--limit", type=float, help="at most this many documents per task (a fraction of each task when below 1)")
    p.add_argument("--batch-size", type=int, default=8, help="requests per forward, per replica (default 8)")
    p.add_argument("--apply-chat-template", action="store_true", help="render prompts with the tokenizer's own chat template")
    p.add_argument("--system-instruction", help="a system message before every prompt")
    p.add_argument("--output", metavar="PATH", help="where results.json goes (default <run>/eval/<stage>-step-N/results.json)")
    p.add_argument("--log-samples", action="store_true", help="also write each request and answer to samples_<task>.jsonl beside the results")
    p.add_argument("--overwrite", action="store_true", help="replace results written before")
    p.add_argument("--stage", help="evaluate this stage's newest checkpoint of RUN_DIR")
    p.add_argument("--nproc-per-node", type=int, help="processes to run (relaunched under torchrun when more than one); "
                                                      "default TP × PP: more make data-parallel replicas that split the requests")
    p.set_defaults(func=handler)


def results_path(step_dir: Path, run_root: Path) -> Path:
    """<run>/eval/<stage>-step-N/results.json for <run>/checkpoints/<stage>/step-N."""
    return run_root / "eval" / f"{step_dir.parent.name}-{step_dir.name}" / "results.json"


def layout_overrides(source: Path, step_dir: Path, run_root: Path, overrides: list[str]) -> list[str]:
    """The overrides to evaluate with: a run dir's own TP/PP/VPP first (a checkpoint dir: none), then the user's."""
    import yaml

    given = {o.partition("=")[0].strip() for o in overrides}
    spec_path = run_root / "spec.resolved.yaml"
    if source.resolve() == step_dir.resolve() or not spec_path.is_file():
        return list(overrides)
    parallelism = (yaml.safe_load(spec_path.read_text()) or {}).get("parallelism") or {}
    own = [f"parallelism.{k}={parallelism[k]}" for k in LAYOUT_KEYS if parallelism.get(k) is not None and f"parallelism.{k}" not in given]
    return [*own, *overrides]


def _argv(args: argparse.Namespace, overrides: list[str], nproc: int) -> list[str]:
    """The command again for each rank of the relaunch (`--opt=value`: a value may start with '-')."""
    argv = ["eval", args.source, *overrides, f"--nproc-per-node={nproc}", f"--tasks={args.tasks}", f"--batch-size={args.batch_size}"]
    for flag, value in (("--num-fewshot", args.num_fewshot), ("--limit", args.limit), ("--output", args.output), ("--stage", args.stage),
                        ("--system-instruction", args.system_instruction)):
        if value is not None:
            argv.append(f"{flag}={value}")
    argv += [f"--include-path={p}" for p in args.include_path]
    argv += [flag for flag, on in (("--apply-chat-template", args.apply_chat_template), ("--log-samples", args.log_samples),
                                   ("--overwrite", args.overwrite)) if on]
    return argv


class _Bar:
    """A rich progress bar over each request kind the harness sends (rank 0)."""

    def __init__(self):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                 TimeRemainingColumn(), transient=False)
        self.task = None

    def begin(self, description: str, total: int) -> None:
        if self.task is None:
            self.progress.start()
        self.task = self.progress.add_task(description, total=total)

    def advance(self, count: int) -> None:
        self.progress.advance(self.task, count)

    def close(self) -> None:
        if self.task is not None:
            self.progress.stop()


def evaluate(args: argparse.Namespace) -> int:
    """`llmforge eval` (cli.cmd_eval)."""
    from llmforge.evaluation.harness import check_tasks, quiet, require_lm_eval, task_manager
    from llmforge.interop.export import find_source
    from llmforge.interop.generate import TextGenerator, generation_layout
    from llmforge.runtime import launch

    require_lm_eval()
    quiet()
    for flag, value, low in (("--batch-size", args.batch_size, 1), ("--num-fewshot", args.num_fewshot, 0)):
        if value is not None and value < low:
            raise UserError(f"{flag} {value} is below {low}", f"give {flag} {low} or more")
    if args.limit is not None and args.limit <= 0:
        raise UserError(f"--limit {args.limit:g} is not positive", "give a count of documents, or a fraction below 1")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise UserError("--tasks names no task", "give comma-separated task names, e.g. --tasks llmforge_add2_mc,llmforge_add2_gen")
    source = Path(args.source)
    found = find_source(source, stage=args.stage)
    overrides = layout_overrides(source, found.step_dir, found.run_root, list(args.overrides))
    layout = generation_layout(overrides, nproc_per_node=args.nproc_per_node)
    if layout.expert_model_parallel_size > 1:
        raise UserError(f"lm-evaluation-harness cannot run at parallelism.expert_model_parallel_size={layout.expert_model_parallel_size}: "
                        "each replica serves its own requests, and an expert-parallel group must run every forward together",
                        "evaluate at parallelism.expert_model_parallel_size=1")
    target = Path(args.output) if args.output else results_path(found.step_dir, found.run_root)
    if target.exists() and not args.overwrite:
        raise UserError(f"{target} exists: this checkpoint was evaluated before", "pass --overwrite to replace it, or --output PATH to write elsewhere")
    manager = task_manager(args.include_path)
    check_tasks(manager, tasks, args.include_path)
    if not launch.under_launcher() and layout.world_size > 1:
        TextGenerator(source, stage=args.stage, template="raw", parallelism=layout, load=False)  # the layout divides the model
        try:
            launch.check_devices(layout, multi_node_flags=False)
        except UserError as e:
            raise UserError(e.args[0], "pass a smaller --nproc-per-node, or a layout that needs fewer processes") from None
        return launch.relaunch(_argv(args, overrides, layout.nproc_per_node), nproc=layout.nproc_per_node, nnodes=1, node_rank=None,
                               rdzv_endpoint=None, resuming=False)
    model = TextGenerator(source, stage=args.stage, template="raw", parallelism=layout)
    try:
        return _run(args, model, manager, tasks, target)
    finally:
        model.close()


def _run(args: argparse.Namespace, model, manager, tasks: list[str], target: Path) -> int:
    from llmforge.evaluation import harness
    from llmforge.evaluation.adapter import LlmforgeLM

    speaks = model.rank == 0
    for chunk in model.server.chunks:  # nothing trains here: the server then need not switch modes at every call
        chunk.eval()
    if speaks:
        print(f"{model.step_dir}: {model.describe_layout()}", file=sys.stderr, flush=True)
    bar = _Bar() if speaks else None
    lm = LlmforgeLM(model.server, model.tokenizer, batch_size=args.batch_size, prefix=model.prefix, progress=bar)
    try:
        results = harness.run(lm, manager, tasks=tasks, num_fewshot=args.num_fewshot, limit=args.limit,
                              apply_chat_template=args.apply_chat_template, system_instruction=args.system_instruction,
                              log_samples=args.log_samples)
    finally:
        if bar is not None:
            bar.close()
    if not speaks or results is None:
        return 0
    results["config"]["model_args"] = {"checkpoint": str(model.step_dir), "layout": model.describe_layout()}
    written = harness.write(results, target)
    from rich.console import Console

    Console().print(harness.table(results))
    print(f"wrote {', '.join(map(str, written))}")
    return 0
