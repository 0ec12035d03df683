"""Run the benchmarks: one line per figure, and benchmarks/results.json with the machine.

    python benchmarks/run.py [--quick] [--only NAME[,NAME...]] [--output PATH]

Benchmarks are the public functions `fn(quick: bool)` of `benchmarks/*_bench.py` (or the
module's `BENCHMARKS` list, when it has one). Each returns a dict or a list of dicts with
`name`, `figure`, `goal`, `met` and `details` (see harness.py). A benchmark that fails
prints `NAME: error ...` and the others still run.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))  # the bench modules import harness.py as a sibling

from harness import machine  # noqa: E402

Benchmark = Callable[[bool], Any]


def _benchmarks_of(module: Any) -> list[Benchmark]:
    explicit = getattr(module, "BENCHMARKS", None)
    if explicit is not None:
        return list(explicit)
    found = []
    for name, fn in inspect.getmembers(module, inspect.isfunction):
        params = list(inspect.signature(fn).parameters)
        if not name.startswith("_") and fn.__module__ == module.__name__ and params[:1] == ["quick"]:
            found.append(fn)
    # Source order: a module lists its benchmarks in the order that reads best.
    return sorted(found, key=lambda fn: fn.__code__.co_firstlineno)


def collect(directory: Path = HERE) -> tuple[dict[str, Benchmark], dict[str, str]]:
    """{name: function} from every `*_bench.py`, and {module: error} for those that fail to import."""
    benches: dict[str, Benchmark] = {}
    broken: dict[str, str] = {}
    for path in sorted(directory.glob("*_bench.py")):
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[path.stem] = module
        try:
            spec.loader.exec_module(module)
        except Exception as e:  # one broken module must not hide the others
            broken[path.stem] = f"{type(e).__name__}: {e}"
            continue
        for fn in _benchmarks_of(module):
            benches[fn.__name__] = fn
    return benches, broken


def line(row: dict[str, Any]) -> str:
    if "error" in row:
        return f"{row['name']}: error {row['error']}"
    unit = f" {row['unit']}" if row.get("unit") else ""
    return f"{row['name']}: {row['figure']}{unit} (goal {row['goal']}) {'met' if row['met'] else 'not met'}"


def run_one(name: str, fn: Benchmark, quick: bool) -> list[dict[str, Any]]:
    start = time.perf_counter()
    try:
        out = fn(quick)
        rows = out if isinstance(out, list) else [out]
        for row in rows:
            missing = {"name", "figure", "goal", "met"} - set(row)
            if missing:
                raise ValueError(f"result lacks {sorted(missing)}")
    except Exception as e:
        tb = traceback.format_exc(limit=-3)
        rows = [{"name": name, "error": f"{type(e).__name__}: {e}", "traceback": tb}]
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    for row in rows:
        row.setdefault("details", {})
        row["time"] = stamp
        row["seconds"] = round(time.perf_counter() - start, 2)
    return rows


def write_results(path: Path, rows: list[dict[str, Any]], quick: bool, keep_others: bool) -> None:
    """Write atomically; with --only, rows of benchmarks that did not run are kept from the last file."""
    previous: list[dict[str, Any]] = []
    if keep_others and path.exists():
        try:
            previous = json.loads(path.read_text()).get("results", [])
        except (json.JSONDecodeError, AttributeError):
            previous = []
    names = {row["name"] for row in rows}
    doc = {
        "machine": machine(),
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "quick": quick,
        "results": [r for r in previous if r.get("name") not in names] + rows,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller inputs and fewer repeats (for smoke tests)")
    parser.add_argument("--only", help="comma-separated benchmark names (function names) to run")
    parser.add_argument("--output", type=Path, default=HERE / "results.json", help="results file (default benchmarks/results.json)")
    args = parser.parse_args(argv)

    benches, broken = collect()
    selected = list(benches)
    if args.only:
        selected = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in selected if n not in benches]
        if unknown:
            print(f"unknown benchmark {', '.join(unknown)}; available: {', '.join(benches) or 'none'}", file=sys.stderr)
            for module, error in broken.items():
                print(f"{module}: error {error}", file=sys.stderr)
            return 2
    rows: list[dict[str, Any]] = []
    if not args.only:
        for module, error in broken.items():
            rows.append({"name": module, "error": error, "details": {}})
            print(line(rows[-1]), flush=True)
    for name in selected:
        for row in run_one(name, benches[name], args.quick):
            rows.append(row)
            print(line(row), flush=True)
    write_results(args.output, rows, args.quick, keep_others=bool(args.only))
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
