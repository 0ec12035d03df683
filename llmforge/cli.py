"""The `llmforge` command: thin verbs over spec → resolve → plan → registry → runtime.

Exit codes: 0 success, 2 bad input (a located message, never a traceback), 1 a failed
run (a stop policy, a full disk, a lost rank), 75 a run stopped by SIGTERM after its final
checkpoint, to be continued with --resume. docs/reliability.md has the details.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

EXIT_BAD_INPUT = 2


def _spec_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", help="path to the spec YAML")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotlist overrides, e.g. stages.1.train.max_steps=10")


def cmd_validate(args: argparse.Namespace) -> int:
    from llmforge.spec.validate import load_and_validate

    spec, _ = load_and_validate(args.spec, args.overrides, check_inputs=not args.skip_inputs)
    stages = ", ".join(f"{s.name} ({s.type})" for s in spec.stages)
    print(f"{args.spec}: valid — {spec.name}: {stages}")
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    from llmforge.registry.manager import get_registry

    registry = get_registry()
    if args.check:
        return _check_factories(registry)
    rows = registry.listing()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    width = max(len(r["kind"]) for r in rows)
    name_width = max(len(r["name"]) for r in rows)
    provider_width = max(len(f"{r['provider']} {r['version']}") for r in rows)
    for r in rows:
        provider = f"{r['provider']} {r['version']}"
        print(f"{r['kind']:<{width}}  {r['name']:<{name_width}}  {provider:<{provider_width}}  {r['description']}".rstrip())
    return 0


def _check_factories(registry) -> int:
    """Import every component's factory, as a run would: exit 2 naming each that fails."""
    from llmforge.registry.components import KINDS, RegistryError

    failed, count = [], 0
    for kind in KINDS:
        for name, reg in sorted(registry.entries[kind].items()):
            if reg.component.factory is None:
                continue  # declared, not built yet: `run` refuses it by name
            count += 1
            try:
                registry.factory(kind, name)
            except RegistryError as e:
                failed.append(str(e))
            except Exception as e:  # importing a plugin's module ran its code
                failed.append(f"{kind} {name!r} from {reg.provider}: importing its factory {reg.component.factory!r} raised "
                              f"{type(e).__name__}: {e}")
    for line in failed:
        print(f"error: {line}", file=sys.stderr)
    broken = registry.unloaded
    for line in broken:
        print(f"error: plugin {line}", file=sys.stderr)
    if failed or broken:
        return EXIT_BAD_INPUT
    print(f"{count} factories import")
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from llmforge.registry.manager import get_registry
    from llmforge.spec.docs import reference_markdown, schema_text, write_atomic

    registry = get_registry()
    text = reference_markdown(registry) if args.markdown else schema_text(registry)
    if args.output:
        write_atomic(args.output, text)
    else:
        sys.stdout.write(text)
    return 0


def _layout_overrides(args: argparse.Namespace) -> list[str]:
    out = []
    if getattr(args, "nproc_per_node", None):
        out.append(f"parallelism.nproc_per_node={args.nproc_per_node}")
    if getattr(args, "nnodes", None):
        out.append(f"parallelism.nnodes={args.nnodes}")
    return out


_AUTO_NOTE_ENV = "LLMFORGE_AUTO_LAYOUT_NOTE"


def _with_auto_layout(spec_path: str, overrides: list[str], spec, loaded, registry, run_dir, *, resume: bool | None = None,
                      overwrite: bool = False, on_this_cpu: bool = False, check_inputs: bool = True):
    """(spec, loaded, overrides, note): the spec at the layout runtime.cpu_layout picks on this CPU machine, validated as if
    the user had written it, or as it was (note None) where the choice does not apply or the spec is not valid at it.

    `on_this_cpu`: `plan --gpu cpu`, which plans for this machine's cores and never imports torch to look for GPUs."""
    from llmforge.runtime import cpu_layout, launch
    from llmforge.spec.errors import SpecError, UserError
    from llmforge.spec.validate import load_and_validate

    if not on_this_cpu and launch.local_devices()[0] != "CPU core":
        return spec, loaded, overrides, None
    recorded = None  # a resumed run keeps the layout it started with
    record = run_dir / "spec.resolved.yaml"
    if resume is not False and not overwrite and record.is_file():
        import yaml

        try:
            recorded = yaml.safe_load(record.read_text())
        except (OSError, yaml.YAMLError):
            recorded = None
    auto = cpu_layout.choose(spec, loaded.data, recorded=recorded)
    if auto is None:
        return spec, loaded, overrides, None
    chosen = [*overrides, *auto.overrides]
    try:
        spec, loaded = load_and_validate(spec_path, chosen, registry=registry, check_inputs=check_inputs)
    except (SpecError, UserError):
        return spec, loaded, overrides, None
    return spec, loaded, chosen, auto.note


def cmd_run(args: argparse.Namespace) -> int:
    import warnings
    from pathlib import Path

    from llmforge.runtime import gc_policy

    gc_policy.quiet()  # no full collections over the imports (runtime.gc_policy)

    # megatron warns on import that TransformerEngine/Apex are absent; on CPU that is expected.
    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex) (and Apex )?(are|is) not installed.*")
    warnings.filterwarnings("ignore", message="full scope is deprecated", module="megatron")

    from llmforge.registry.manager import get_registry
    from llmforge.resolve import resolve, unimplemented
    from llmforge.runtime import launch
    from llmforge.spec.errors import UserError
    from llmforge.spec.validate import load_and_validate

    registry = get_registry()
    overrides = [*args.overrides, *_layout_overrides(args)]
    spec, loaded = load_and_validate(args.spec, overrides, registry=registry)
    plan = resolve(spec, registry)
    missing = unimplemented(plan, registry)
    if missing:
        raise UserError("this spec uses components that are declared but not implemented yet: " + "; ".join(missing),
                        "pick implemented components (`llmforge plugins`), or drop the stages that need them")
    run_dir = Path(args.run_dir or spec.resolved_run_dir)
    resume = None if args.resume_or_start else args.resume
    note = None
    if not launch.under_launcher():
        # The layout the user could have written (runtime.cpu_layout), on a CPU machine.
        spec, loaded, overrides, note = _with_auto_layout(args.spec, overrides, spec, loaded, registry, run_dir, resume=resume,
                                                          overwrite=args.overwrite)
        if note:
            plan = resolve(spec, registry)
    if not launch.under_launcher():
        launch.check_devices(spec.parallelism, multi_node_flags=bool(args.rdzv_endpoint))
    if not launch.under_launcher() and spec.parallelism.world_size > 1:
        from llmforge.runtime.executor import prepare_run_dir

        run, resuming = prepare_run_dir(spec, loaded.data, plan, run_dir, resume=resume, overwrite=args.overwrite,
                                        allow_spec_change=args.allow_spec_change)
        argv = ["run", args.spec, *overrides, "--run-dir", str(run_dir)]
        code = launch.relaunch(argv, nproc=spec.parallelism.nproc_per_node, nnodes=spec.parallelism.nnodes,
                               node_rank=args.node_rank, rdzv_endpoint=args.rdzv_endpoint, resuming=resuming,
                               preempt_timeout=spec.checkpoint.preempt_timeout, extra_env={_AUTO_NOTE_ENV: note} if note else None)
        run.unlock()
        return code
    from llmforge.runtime.checkpoint import CheckpointWriteError
    from llmforge.runtime.distributed import collective_failure
    from llmforge.runtime.executor import execute
    from llmforge.runtime.train import EXIT_PREEMPTED, Preempted, TrainingStopped

    try:
        execute(spec, loaded.data, plan, registry, run_dir=run_dir, resume=resume, overwrite=args.overwrite,
                allow_spec_change=args.allow_spec_change, command=["run", os.path.abspath(args.spec), *overrides])
    except (TrainingStopped, CheckpointWriteError) as e:
        # Every rank stops alike on a policy; a failed write may be one rank's own disk.
        if isinstance(e, CheckpointWriteError) or os.environ.get("RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr)
        return 1
    except Preempted as e:
        if os.environ.get("RANK", "0") == "0":
            print(str(e), file=sys.stderr)
        return EXIT_PREEMPTED
    except Exception as e:
        from llmforge.registry.errors import plugin_failure, report

        failure = plugin_failure(e, registry)
        if failure is not None:  # a plugin's code raised: one line naming it, the traceback in run.log
            return report(failure, run_dir / "run.log")
        message = collective_failure(e, timeout_s=spec.parallelism.collective_timeout_s)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        # The process group is broken: tearing it down could wait on the lost rank.
        os._exit(1)
    finally:
        if "torch.distributed" in sys.modules:
            from llmforge.runtime.distributed import shutdown

            shutdown()
    return 0


def cmd_launch_slurm(args: argparse.Namespace) -> int:
    from pathlib import Path

    from llmforge.plan.build import build_plan
    from llmforge.plan.catalog import get_device
    from llmforge.registry.manager import get_registry
    from llmforge.runtime.slurm import write_slurm_script
    from llmforge.spec.validate import load_and_validate

    registry = get_registry()
    spec, _ = load_and_validate(args.spec, args.overrides, registry=registry, check_inputs=False)
    out = Path(args.output or f"{spec.name}.sbatch")
    plan = build_plan(spec, registry=registry, device=get_device(args.gpu), run_dir=Path(spec.resolved_run_dir), spec_path=args.spec)
    write_slurm_script(spec, args.spec, args.overrides, out, time=args.time, partition=args.partition, account=args.account,
                       cpus_per_task=args.cpus_per_task, port=args.port, plan=plan, signal_margin=args.signal_margin)
    print(f"wrote {out}: {spec.parallelism.nnodes} node(s) × {spec.parallelism.nproc_per_node} GPU(s); submit with `sbatch {out}`")
    print("\n".join(line.removeprefix("# ") for line in out.read_text().splitlines() if line.startswith(("# Planned", "# At --time"))))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from llmforge.runtime.status import field_text, render, run_status

    status = run_status(args.run_dir)
    if args.field:
        print(field_text(status, args.field))
    elif args.json:
        print(json.dumps(status, indent=2))
    else:
        print("\n".join(render(status)))
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from pathlib import Path

    from llmforge.plan.build import build_plan
    from llmforge.plan.catalog import get_device
    from llmforge.registry.manager import get_registry
    from llmforge.spec.validate import load_and_validate

    registry = get_registry()
    device = get_device(args.gpu)
    # A cluster spec's data usually lives on the cluster: plan without it (budgets say so).
    overrides = [*args.overrides, *_layout_overrides(args)]
    spec, loaded = load_and_validate(args.spec, overrides, registry=registry, check_inputs=False)
    run_dir = Path(args.run_dir or spec.resolved_run_dir)
    note = None
    if args.gpu == "cpu":  # `run` on this machine would pick this layout (runtime.cpu_layout): plan what will run
        spec, loaded, overrides, note = _with_auto_layout(args.spec, overrides, spec, loaded, registry, run_dir, on_this_cpu=True,
                                                          check_inputs=False)
    plan = build_plan(spec, registry=registry, device=device, run_dir=run_dir, spec_path=args.spec, mfu=args.mfu)
    if note:
        plan["layout_note"] = f"{note} (on this machine, as `llmforge run` will)"
    if args.json:
        print(json.dumps(plan, indent=2))
    else:
        from llmforge.plan.report import render

        render(plan)
    return 0


def cmd_export_hf(args: argparse.Namespace) -> int:
    from llmforge.interop.export import export_hf
    from llmforge.interop.verify import ExportCheckFailed

    try:
        done = export_hf(args.source, args.out_dir, stage=args.stage, dtype=args.dtype, max_shard_size=args.max_shard_size,
                         overwrite=args.overwrite, peft=args.peft, verify=not args.no_verify, log=lambda m: print(m, flush=True))
    except ExportCheckFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    no_tokenizer = "" if done["tokenizer"] else " (the run has no tokenizer)"
    unchecked = "\n  not checked (--no-verify)" if args.no_verify else ""
    if args.peft:
        lora = done["peft"]
        print(f"exported the LoRA adapters of {done['checkpoint']} in PEFT format to {done['out_dir']}: {done['adapted_modules']} "
              f"modules (r={lora['r']}, lora_alpha={lora['lora_alpha']:g}, target_modules={', '.join(lora['target_modules'])}, "
              f"{done['adapter_parameters']:,} parameters, {done['dtype']})\n"
              f"  base model: {done['base_checkpoint']} as {done['architecture']} in {done['base_dir']}{no_tokenizer}\n"
              f"  load with PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({done['base_dir']!r}), {done['out_dir']!r})"
              f"{unchecked}")
        return 0
    print(f"exported {done['checkpoint']} as {done['architecture']} ({done['parameters']:,} parameters, {done['dtype']}) "
          f"to {done['out_dir']}: {', '.join(done['weight_files'])}{no_tokenizer}{unchecked}")
    return 0


def cmd_import_hf(args: argparse.Namespace) -> int:
    from pathlib import Path

    from llmforge.interop.import_ import import_hf

    done = import_hf(args.hf_dir, args.out, overwrite=args.overwrite)
    if done["tokenizer"]:
        tokenizer = (f"\n  tokenizer:  {Path(done['out']) / 'tokenizer'}  (the HF files as they are; generation stops at ids "
                     f"{', '.join(map(str, done['stop_ids'])) or 'none: the tokenizer has no eos token'})")
    else:
        tokenizer = f"\n  no tokenizer.json in {args.hf_dir}: give the spec a tokenizer of its own"
    print(f"imported {done['architecture']} (family {done['family']}, {done['parameters']:,} parameters) from {args.hf_dir}\n"
          f"  checkpoint: {done['checkpoint']}  (a stage starts from it with `init_from: {done['checkpoint']}`; "
          f"`llmforge generate` reads it as it is)\n"
          f"  model spec: {done['model_spec']}  (`extends:` it, or copy its model: section){tokenizer}")
    return 0


def _generate_argv(args: argparse.Namespace, nproc: int) -> list[str]:
    """The generate command again, for each rank of the relaunch (`--opt=value`: a prompt may start with '-')."""
    argv = ["generate", args.source, *args.overrides, f"--nproc-per-node={nproc}", f"--template={args.template}",
            f"--max-new-tokens={args.max_new_tokens}", f"--temperature={args.temperature}", f"--top-p={args.top_p}", f"--seed={args.seed}"]
    for flag, value in (("--prompt", args.prompt), ("--stage", args.stage), ("--top-k", args.top_k)):
        if value is not None:
            argv.append(f"{flag}={value}")
    return [*argv, "--interactive"] if args.interactive else argv


def cmd_generate(args: argparse.Namespace) -> int:
    import warnings

    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex) (and Apex )?(are|is) not installed.*")
    warnings.filterwarnings("ignore", message="full scope is deprecated", module="megatron")

    from llmforge.interop.generate import TextGenerator, generation_layout
    from llmforge.runtime import launch
    from llmforge.spec.errors import UserError

    if args.prompt is None and not args.interactive:
        raise UserError("nothing to continue", "give --prompt TEXT, or --interactive to type prompts")
    layout = generation_layout(args.overrides, nproc_per_node=args.nproc_per_node, interactive=args.interactive)
    if not launch.under_launcher() and layout.world_size > 1:
        # What one process can check without the model, before any rank starts.
        checked = TextGenerator(args.source, stage=args.stage, template=args.template, parallelism=layout, load=False)
        if args.prompt is not None:
            checked.checked_ids(args.prompt)
        try:
            launch.check_devices(layout, multi_node_flags=False)
        except UserError as e:
            raise UserError(e.args[0], "pass a smaller --nproc-per-node, or a layout that needs fewer processes") from None
        return launch.relaunch(_generate_argv(args, layout.nproc_per_node), nproc=layout.nproc_per_node, nnodes=1, node_rank=None,
                               rdzv_endpoint=None, resuming=False)
    model = TextGenerator(args.source, stage=args.stage, template=args.template, parallelism=layout)
    try:
        speaks = model.rank == 0  # every rank computes every answer; one prints it
        if speaks and model.world_size > 1:
            print(f"{model.step_dir}: {model.describe_layout()}", file=sys.stderr, flush=True)
        count = 0

        def answer(prompt: str) -> None:
            nonlocal count
            # The n-th prompt (from 0) samples with seed --seed + n: --prompt alone uses --seed itself.
            text = model(prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                         seed=args.seed + count)
            count += 1
            if speaks:
                print(text, flush=True)

        if args.prompt is not None:
            answer(args.prompt)
        if args.interactive:
            if speaks:
                print(f"{model.step_dir} — one prompt per line; an empty line or Ctrl-D ends", file=sys.stderr)

            def read() -> str:
                return input("> ") if sys.stdin.isatty() else sys.stdin.readline()

            while True:
                try:
                    line = read() if speaks else None
                except EOFError:
                    line = ""
                prompt = (model.share(line) or "").rstrip("\n")
                if not prompt:
                    break
                try:
                    answer(prompt)
                except UserError as e:  # a prompt too long for the model: every rank refuses it alike, and reads on
                    if speaks:
                        print(f"error: {e}", file=sys.stderr, flush=True)
    finally:
        model.close()
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import warnings

    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex) (and Apex )?(are|is) not installed.*")
    warnings.filterwarnings("ignore", message="full scope is deprecated", module="megatron")
    # torch's checkpoint notices on load (ShardedTensor deprecation, single-process loading).
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed.checkpoint")
    warnings.filterwarnings("ignore", category=UserWarning, module="torch.distributed.checkpoint")
    from llmforge.evaluation.command import evaluate

    return evaluate(args)


def _generate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="continue prompts with a trained checkpoint (KV-cache sampling, at any TP/PP layout)",
                       description="Continue prompts with a checkpoint of any layout. One process by default; layout overrides "
                                   "(e.g. parallelism.pipeline_model_parallel_size=2) and --nproc-per-node relaunch the command "
                                   "under torchrun, each rank loading its shard of the model (the saved layout is resharded on load). "
                                   "Greedy and seeded sampled text is the same at every layout.")
    p.add_argument("source", metavar="RUN_DIR|CHECKPOINT", help="a run dir (its last stage's newest checkpoint) or a checkpoints/<stage>/step-N dir")
    p.add_argument("overrides", nargs="*", metavar="parallelism.KEY=VALUE",
                   help="layout to generate at, e.g. parallelism.pipeline_model_parallel_size=2 or parallelism.tensor_model_parallel_size=2 "
                        "(default TP=1, PP=1; any layout, whatever layout saved the checkpoint)")
    p.add_argument("--prompt", help="the text to continue")
    p.add_argument("--interactive", action="store_true", help="read prompts from stdin, one per line, until an empty line")
    p.add_argument("--stage", help="use this stage's newest checkpoint of RUN_DIR")
    p.add_argument("--template", default="auto",
                   help="chat template: auto (the stage's, for finetune stages; else raw text), raw, tokenizer (the tokenizer's own Jinja "
                        "chat template, with its generation prompt), default, plain, or a string with {prompt} and {response}")
    p.add_argument("--max-new-tokens", type=int, default=64, help="most tokens to add (generation also stops at end-of-sequence)")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0 = greedy")
    p.add_argument("--top-k", type=int, help="sample only from the k most likely tokens")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: the smallest set of tokens holding this much probability")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the sampler (the n-th prompt, from 0, uses seed + n); the same seed gives the same text at every layout")
    p.add_argument("--nproc-per-node", type=int,
                   help="processes to run (relaunched under torchrun when more than one); default TP × PP of the layout overrides")
    p.set_defaults(func=cmd_generate)


def _interop_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write a checkpoint in another framework's format")
    formats = p.add_subparsers(dest="format", required=True, metavar="FORMAT")
    q = formats.add_parser("hf", help="a Hugging Face model directory of the model's family (Llama, Mistral, Qwen2, Qwen3, GPT-2): "
                                       "config.json, safetensors, tokenizer files; checked with transformers before it is published")
    q.add_argument("source", metavar="RUN_DIR|CHECKPOINT", help="a run dir (its last stage's newest checkpoint) or a checkpoints/<stage>/step-N dir")
    q.add_argument("out_dir", metavar="OUT_DIR", help="the directory to write (created atomically)")
    q.add_argument("--stage", help="export this stage's newest checkpoint of RUN_DIR")
    q.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                   help="dtype of the exported weights (default: float32, or the imported dtype when exporting an import itself)")
    q.add_argument("--max-shard-size", default="5GB", help="split safetensors files larger than this, with an index (e.g. 2GB)")
    q.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    q.add_argument("--peft", action="store_true",
                   help="for a lora stage's checkpoint: write the adapters unmerged as a PEFT adapter directory "
                        "(adapter_config.json, adapter_model.safetensors) in OUT_DIR and the frozen base model in OUT_DIR/base")
    q.add_argument("--no-verify", action="store_true",
                   help="publish without the self-check (by default transformers loads the export and must compute llmforge's "
                        "logits on a few fixed sequences, else nothing is published and the exit code is 1)")
    q.set_defaults(func=cmd_export_hf)

    p = sub.add_parser("import", help="turn another framework's model into an llmforge checkpoint")
    formats = p.add_subparsers(dest="format", required=True, metavar="FORMAT")
    q = formats.add_parser("hf", help="a local Hugging Face directory: Llama 2/3.x, Mistral, Qwen2/2.5, Qwen3 or GPT-2 (nothing is downloaded)")
    q.add_argument("hf_dir", metavar="HF_DIR", help="a directory with config.json and safetensors (or pytorch_model.bin) weights")
    q.add_argument("out", metavar="OUT", help="where the checkpoint, model.yaml and tokenizer go (created atomically)")
    q.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT")
    q.set_defaults(func=cmd_import_hf)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmforge", description="Train, evaluate and export LLMs from one YAML spec.")
    from llmforge import __version__

    parser.add_argument("--version", action="version", version=f"llmforge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("validate", help="check a spec; exit 0 if valid, 2 if not")
    _spec_args(p)
    p.add_argument("--skip-inputs", action="store_true", help="do not check that input files exist, nor what the run needs installed (TransformerEngine for fp8): they live elsewhere")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("plan", help="what a spec costs before it runs: parameters, FLOPs, memory per rank, tokens, time")
    _spec_args(p)
    p.add_argument("--json", action="store_true", help="print the plan as JSON instead of tables")
    p.add_argument("--gpu", default="h100-80gb", metavar="NAME",
                   help="device to plan for: h100-80gb (default), h200-141gb, a100-40gb, a100-80gb, l40s-48gb, cpu")
    p.add_argument("--nnodes", type=int, help="machines in the job (overrides parallelism.nnodes)")
    p.add_argument("--nproc-per-node", type=int, help="processes (GPUs) per machine (overrides parallelism.nproc_per_node)")
    p.add_argument("--mfu", type=float, help="model FLOPs utilization to assume (default: 0.40 on GPUs, 0.30 on the CPU)")
    p.add_argument("--run-dir", help="run dir whose data/manifest.json gives the real token counts (default: the spec's)")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("run", help="execute a spec's stages (relaunches under torchrun for several processes)")
    _spec_args(p)
    p.add_argument("--run-dir", help="where outputs go (default: the spec's run_dir, or runs/<name>)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue a stopped run from its newest complete checkpoint")
    mode.add_argument("--overwrite", action="store_true", help="delete the run dir and start over")
    mode.add_argument("--resume-or-start", action="store_true", help="resume if the run dir holds this run, else start (for requeued jobs)")
    p.add_argument("--allow-spec-change", action="store_true", help="resume even though the spec changed")
    p.add_argument("--nproc-per-node", type=int, help="processes on this machine (overrides parallelism.nproc_per_node)")
    p.add_argument("--nnodes", type=int, help="machines in the job (overrides parallelism.nnodes)")
    p.add_argument("--node-rank", type=int, help="this machine's rank in a multi-node job (passed to torchrun)")
    p.add_argument("--rdzv-endpoint", help="HOST:PORT of the rendezvous for a multi-node job (passed to torchrun)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("launch", help="write a cluster launch script for a spec")
    launch_sub = p.add_subparsers(dest="launcher", required=True, metavar="LAUNCHER")
    q = launch_sub.add_parser("slurm", help="write an sbatch script with srun + torchrun rendezvous")
    _spec_args(q)
    q.add_argument("--output", "-o", help="script path (default <name>.sbatch)")
    q.add_argument("--time", default="48:00:00", help="SBATCH --time")
    q.add_argument("--partition", help="SBATCH --partition")
    q.add_argument("--account", help="SBATCH --account")
    q.add_argument("--cpus-per-task", type=int, default=32, help="CPU cores per node for data loading")
    q.add_argument("--port", type=int, default=29500, help="rendezvous port on the head node")
    q.add_argument("--signal-margin", type=int, metavar="SECONDS",
                   help="seconds before the time limit at which Slurm sends SIGTERM to every rank (they checkpoint, exit 75 and the "
                        "job requeues itself); default checkpoint.preempt_timeout + 90")
    q.add_argument("--gpu", default="h100-80gb", metavar="NAME", help="the cluster's device, for the planned time in the header (as `llmforge plan --gpu`)")
    q.set_defaults(func=cmd_launch_slurm)

    p = sub.add_parser("status", help="where a run stands: each stage's state, step, metrics, newest checkpoint, the last exit, how to continue")
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run dir of a `llmforge run`")
    p.add_argument("--json", action="store_true", help="everything as JSON")
    p.add_argument("--field", metavar="NAME", help="print one top-level field (e.g. next: done|running|resume|fix; progress), for scripts")
    p.set_defaults(func=cmd_status)

    _interop_parsers(sub)
    _generate_parser(sub)
    from llmforge.evaluation.command import add_parser as add_eval_parser

    add_eval_parser(sub, cmd_eval)

    p = sub.add_parser("plugins", help="list registered components and who provides them")
    p.add_argument("--json", action="store_true", help='a list of {"kind", "name", "provider", "version", "description"}')
    p.add_argument("--check", action="store_true",
                   help="import every component's factory, as a run would, and report each that fails (exit 2)")
    p.set_defaults(func=cmd_plugins)

    p = sub.add_parser("schema", help="print the JSON Schema of the spec, plugin components included")
    p.add_argument("--markdown", action="store_true", help="the Markdown reference (docs/spec-reference.md) instead")
    p.add_argument("--output", metavar="PATH", help="write to PATH (atomically) instead of stdout")
    p.set_defaults(func=cmd_schema)
    return parser


def main(argv: list[str] | None = None) -> int:
    if argv is None and sys.argv[1:2] == ["run"]:
        # The command line's own `llmforge run` (not a main(argv) inside another program): once,
        # before torch is imported, re-execute with glibc's malloc tunables (runtime.host_malloc).
        from llmforge.runtime.host_malloc import reexec_with_huge_pages

        reexec_with_huge_pages()
    from llmforge.registry.components import RegistryError
    from llmforge.spec.errors import SpecError, UserError

    parser = build_parser()
    # Overrides may follow options (`run spec.yaml --run-dir d k=v`), which argparse's
    # positional nargs="*" does not collect; gather such KEY=VALUE words here.
    args, extra = parser.parse_known_args(argv)
    stray = [w for w in extra if w.startswith("-") or "=" not in w or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        code = args.func(args)
        sys.stdout.flush()  # inside the try: a closed pipe must not raise at exit
        return code
    except SpecError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (UserError, RegistryError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `llmforge plugins --json | head`: the reader has gone; nothing more to say, and no traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
