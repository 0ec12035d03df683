"""The console view of a plan: one table for the model, one per stage, with rich.

It renders the dict `build_plan` returns and adds nothing of its own, so the console and
`--json` always agree. rich is imported here, lazily, only when printing.
"""

from __future__ import annotations

from typing import Any

from llmforge.plan.fit import MAX_DEVICE_DOUBLINGS


def escape(text: str) -> str:
    """`text` with rich's markup brackets escaped (paths and notes come from the user)."""
    from rich.markup import escape as rich_escape

    return rich_escape(text)


def gib(n: float | None) -> str:
    return "—" if n is None else f"{n / 2**30:,.2f} GiB"


def count(n: float | None) -> str:
    """1234567 → '1.23 M' (and B for billions, T for trillions)."""
    if n is None:
        return "—"
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:,.2f} {unit}"
    return f"{n:,.0f}"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    for unit, scale in (("days", 86400), ("h", 3600), ("min", 60)):
        if seconds >= scale:
            return f"{seconds / scale:,.1f} {unit}"
    return f"{seconds:.2f} s" if seconds >= 0.01 else f"{seconds * 1e3:.2f} ms"


def _layout_line(layout: dict[str, Any]) -> str:
    parts = [f"TP {layout['tensor_model_parallel_size']} × PP {layout['pipeline_model_parallel_size']} × DP {layout['data_parallel_size']}"]
    if layout["virtual_pipeline_model_parallel_size"]:
        parts.append(f"{layout['virtual_pipeline_model_parallel_size']} virtual chunks")
    if layout["sequence_parallel"]:
        parts.append("sequence parallel")
    if layout["recompute_granularity"] != "none":
        parts.append(f"{layout['recompute_granularity']} recompute")
    if layout["use_distributed_optimizer"]:
        parts.append("distributed optimizer")
    return ", ".join(parts)


def _components_table(plan: dict[str, Any]):
    from rich.table import Table

    table = Table(title="Components", title_justify="left")
    for col in ("used by", "kind", "name", "provider"):
        table.add_column(col)
    for comp in plan["components"]["shared"]:
        table.add_row("spec", comp["kind"], comp["name"], f"{comp['provider']} {comp['version']}")
    for stage, comps in plan["components"]["stages"].items():
        for comp in comps:
            table.add_row(stage, comp["kind"], comp["name"], f"{comp['provider']} {comp['version']}")
    return table


def _model_table(plan: dict[str, Any]):
    from rich.table import Table

    table = Table(title="Model", title_justify="left", show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_row("parameters", f"{plan['params_total']:,} ({count(plan['params_total'])})")
    if plan.get("params_active", plan["params_total"]) != plan["params_total"]:
        table.add_row("active per token (top-k experts)", f"{plan['params_active']:,} ({count(plan['params_active'])})")
    for i, n in enumerate(plan["params_per_rank"]):
        table.add_row(f"per rank, pipeline stage {i}", f"{n:,} ({count(n)})")
    table.add_row("FLOPs per token (fwd + bwd)", f"{plan['flops_per_token']:.4g}")
    return table


_MEMORY_COLUMNS = (("weights", "weights"), ("gradients", "grads"), ("optimizer_states", "optim"), ("activations", "activ"),
                   ("logits", "logits"), ("loss_workspace", "loss ws"), ("recompute_buffer", "recomp"),
                   ("frozen_models", "frozen"), ("kv_cache", "kv cache"), ("fp8_weights", "fp8 w"), ("total", "total"))


def _memory_table(stage: dict[str, Any]):
    from rich.table import Table

    ranks = stage["memory_per_rank"]
    # Terms that are zero on every rank (no recompute, no logits on one stage) are left out.
    shown = [(key, label) for key, label in _MEMORY_COLUMNS if any(r[key] for r in ranks) or key == "total"]
    table = Table(title=f"Memory per rank, GiB — {stage['name']}", title_justify="left")
    for col in ("PP stage", "in flight", *(label for _, label in shown)):
        table.add_column(col, justify="right")
    for r in ranks:
        row = [str(r["pipeline_stage"]), str(r["in_flight_microbatches"]), *(f"{r[key] / 2**30:,.2f}" for key, _ in shown)]
        if r["pipeline_stage"] == stage["largest_pipeline_stage"]:
            row[-1] = f"[bold]{row[-1]}[/bold]"
        table.add_row(*row)
    return table


def _stage_table(stage: dict[str, Any]):
    from rich.table import Table

    table = Table(title=f"Stage {stage['name']} ({stage['type']})", title_justify="left", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    if stage.get("tokens_per_step") is None:
        if stage.get("dataset_tokens") is not None:
            table.add_row("tokens written", f"{count(stage['dataset_tokens'])} in {stage['samples_per_epoch']:,} train samples")
        table.add_row("data", escape(stage["note"]))
        return table
    table.add_row("tokens", f"{count(stage['tokens'])} ({stage['source']})")
    table.add_row("steps", "unknown" if stage["steps"] is None else f"{stage['steps']:,}")
    table.add_row("epochs", "unknown" if stage["epochs"] is None else f"{stage['epochs']:.3g}")
    table.add_row("batch", f"{stage['global_batch_size']} sequences = {stage['tokens_per_step']:,} tokens per step; "
                           f"micro batch {stage['micro_batch_size']}, {stage['num_microbatches']} micro batches per rank")
    if stage["note"]:
        table.add_row("data", escape(stage["note"]))
    step = stage["step_time"]
    table.add_row("step time", f"{duration(step['seconds'])} (bubble {step['bubble_fraction']:.1%}, "
                               f"recompute ×{step['recompute_factor']:.3f}) — {count(stage['tokens_per_s'])} tokens/s")
    table.add_row("total time", duration(stage["total_time_s"]))
    ck = stage["checkpoints"]
    every = f"every {ck['interval_steps']:,} steps and at the end" if ck["interval_steps"] else "at the end only"
    saves = "" if ck["saves"] is None else f", {ck['saves']:,} saves"
    table.add_row("checkpoints", f"{every}{saves}; {gib(ck['bytes_each'])} each, keep {ck['keep_last']}: "
                                 + ("disk unknown" if ck["disk_bytes"] is None else f"up to {gib(ck['disk_bytes'])} on disk"))
    table.add_row("precision", f"{stage['precision']}; optimizer {stage['optimizer']['assumes']}")
    return table


def _value(v: Any) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def _verdict(stage: dict[str, Any]) -> str:
    used, usable = stage["largest_total"], stage["usable_bytes_per_rank"]
    where = f"pipeline stage {stage['largest_pipeline_stage']}"
    if stage["fits"]:
        return f"[green]fits[/green]: the largest rank ({where}) needs {gib(used)} of {gib(usable)} usable ({used / usable:.0%})"
    text = f"[bold red]does not fit[/bold red]: {where} needs {gib(used)} per rank, {gib(usable)} usable"
    fix = stage["fix"]
    if fix is None:
        return text + f"\n  no layout fits on up to {2 ** MAX_DEVICE_DOUBLINGS}× the devices; shrink the model or the sequence"
    changes = ", ".join(f"{c['setting']} {_value(c['from'])} → {_value(c['to'])}" for c in fix["changes"])
    return (f"{text}\n  cheapest change: {changes}\n  → {gib(fix['largest_total'])} per rank on {fix['world_size']} devices, "
            f"step {duration(fix['step_time_s'])}\n  overrides: {' '.join(fix['overrides'])}")


def render(plan: dict[str, Any], console=None) -> None:
    """Print the plan as rich tables."""
    from rich.console import Console

    console = console or Console()
    device = plan["device"]
    console.print(f"[bold]{plan['name']}[/bold] ({escape(plan['spec'])}) on [bold]{device['name']}[/bold]: {device['description']}, "
                  f"{gib(device['memory_bytes'])}")
    if "layout" in plan:
        layout = plan["layout"]
        console.print(f"{layout['world_size']} ranks = {layout['nnodes']} node(s) × {layout['nproc_per_node']}: {_layout_line(layout)}")
    if "layout_note" in plan:
        console.print(escape(plan["layout_note"]))
    console.print(_components_table(plan))
    if "note" in plan:
        console.print(escape(plan["note"]))
        return
    console.print(_model_table(plan))
    for stage in plan["stages"]:
        console.print(_stage_table(stage))
        if "memory_per_rank" in stage:
            console.print(_memory_table(stage))
            console.print(_verdict(stage))
    console.print(f"[bold]total training time[/bold]: {duration(plan['total_time_s'])}")
    console.print("[bold]assumptions[/bold]")
    for line in plan["assumptions"]:
        console.print(f"  • {line}")
