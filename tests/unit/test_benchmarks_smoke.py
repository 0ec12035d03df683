"""The benchmark harness: collection, one line per figure, errors isolated, results.json."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINE = re.compile(r"^(?P<name>\w+): (?P<figure>\S+)( \S+)? \(goal (?P<goal>[^)]+)\) (?P<met>met|not met)$")


def load_run_module():
    spec = importlib.util.spec_from_file_location("benchmarks_run", ROOT / "benchmarks" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_collects_bench_functions_and_isolates_failures(tmp_path, capsys):
    run = load_run_module()
    (tmp_path / "good_bench.py").write_text(
        "def _helper(quick): raise AssertionError('private helpers are not benchmarks')\n"
        "def speed(quick):\n    return {'name': 'speed', 'figure': 2.5 if quick else 3.0, 'goal': '>= 2', 'met': True, 'details': {}, 'unit': 'x'}\n"
        "def pair(quick):\n    return [{'name': 'a', 'figure': 1, 'goal': 2, 'met': False, 'details': {}}, {'name': 'b', 'figure': 3, 'goal': 2, 'met': True, 'details': {}}]\n"
        "def failing(quick):\n    raise RuntimeError('no data here')\n"
    )
    (tmp_path / "broken_bench.py").write_text("import not_a_real_module\n")
    (tmp_path / "notes.py").write_text("def ignored(quick): raise AssertionError\n")
    benches, broken = run.collect(tmp_path)
    assert list(benches) == ["speed", "pair", "failing"]
    assert broken == {"broken_bench": "ModuleNotFoundError: No module named 'not_a_real_module'"}
    lines = [run.line(row) for name, fn in benches.items() for row in run.run_one(name, fn, quick=True)]
    assert lines == ["speed: 2.5 x (goal >= 2) met", "a: 1 (goal 2) not met", "b: 3 (goal 2) met", "failing: error RuntimeError: no data here"]


def test_results_json_keeps_other_benchmarks_when_one_is_rerun(tmp_path):
    run = load_run_module()
    out = tmp_path / "results.json"
    run.write_results(out, [{"name": "x", "figure": 1}, {"name": "y", "figure": 2}], quick=False, keep_others=False)
    run.write_results(out, [{"name": "y", "figure": 5}], quick=True, keep_others=True)
    doc = json.loads(out.read_text())
    assert {r["name"]: r["figure"] for r in doc["results"]} == {"x": 1, "y": 5}
    assert {"cpu", "cores", "torch", "python"} <= set(doc["machine"]) and doc["time"]


def test_compare_alternates_baseline_and_subject():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from harness import compare
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    calls: list[str] = []

    def measure(who: str, value: float):
        def fn() -> float:
            calls.append(who)
            return value

        return fn

    result = compare(measure("base", 2.0), measure("subj", 1.0), repeats=4)
    assert calls == ["base", "subj", "subj", "base", "base", "subj", "subj", "base"]
    assert result.ratio == 0.5 and result.details()["baseline_median"] == 2.0


@pytest.mark.slow
def test_validate_latency_runs_and_prints_its_line(tmp_path):
    out = tmp_path / "results.json"
    proc = subprocess.run([sys.executable, "benchmarks/run.py", "--quick", "--only", "validate_latency", "--output", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    [line] = proc.stdout.splitlines()
    m = LINE.match(line)
    assert m and m["name"] == "validate_latency" and m["goal"] == "< 0.5 s", line
    assert 0 < float(m["figure"]) < 30
    [row] = json.loads(out.read_text())["results"]
    assert row["details"]["heavy_imports"] == [] and 0 < row["details"]["import_share"] <= 1


@pytest.mark.slow
def test_unknown_benchmark_name_exits_2():
    proc = subprocess.run([sys.executable, "benchmarks/run.py", "--only", "no_such_bench", "--output", "/dev/null"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown benchmark no_such_bench; available: " in proc.stderr
    assert "validate_latency" in proc.stderr
