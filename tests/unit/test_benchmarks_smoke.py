"""The benchmark harness: collection, one line per figure, errors isolated, results.json."""

from __future__ import annotations

import importlib.util
import json
import os
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


# The benchmarks that build llmforge's model (train_bench, time_to_loss_bench, memory_bench,
# checkpoint_bench, generate_bench, lm_eval_bench): each starts, prints its one line and records the
# details docs/performance.md reads.
MODEL_BENCHMARKS = {
    "train_step": (">= 1.0", {"ratios", "shapes"}),
    "time_to_loss": ("<= 1.0", {"llmforge", "reference", "target_val_loss"}),
    "memory": ("<= 1.1", {"llmforge_peak_above_baseline_mb", "reference_peak_above_baseline_mb"}),
    "checkpoint": ("<= 1.5", {"ratios", "sizes"}),
    "generate_speed": (">= 3.0", {"cases", "workload"}),
    "lm_eval_requests": (">= 1.0", {"requests", "max_loglikelihood_difference", "workload"}),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODEL_BENCHMARKS))
def test_model_benchmark_runs_quick_and_prints_its_line(name, tmp_path):
    if name == "time_to_loss":
        corpus = Path(os.environ.get("TINYSHAKESPEARE", ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"))
        if not corpus.exists():
            pytest.skip(f"time_to_loss needs the tinyshakespeare corpus ({corpus} is absent; set TINYSHAKESPEARE)")
    goal, keys = MODEL_BENCHMARKS[name]
    out = tmp_path / "results.json"
    proc = subprocess.run([sys.executable, "benchmarks/run.py", "--quick", "--only", name, "--output", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # The named row first; a benchmark may add rows of its own after it, named NAME_* (checkpoint's).
    line, *extra = proc.stdout.splitlines()
    m = LINE.match(line)
    assert m and m["name"] == name and m["goal"] == goal, line
    assert float(m["figure"]) > 0
    assert all((e := LINE.match(x)) and e["name"].startswith(name + "_") for x in extra), extra
    row, *more = json.loads(out.read_text())["results"]
    assert len(more) == len(extra) and keys <= set(row["details"]), sorted(row["details"])


@pytest.mark.slow
def test_side_by_side_reports_each_round_and_a_median_of_segments():
    """benchmarks/side_by_side.py: both runs report every 50 steps, pinned one per core, and a round's ratios come back."""
    corpus = Path(os.environ.get("TINYSHAKESPEARE", ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"))
    if not corpus.exists():
        pytest.skip(f"side_by_side needs the tinyshakespeare corpus ({corpus} is absent; set TINYSHAKESPEARE)")
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("side_by_side pins each run to a core of its own: needs two")
    proc = subprocess.run([sys.executable, "benchmarks/side_by_side.py", "--steps", "150", "--rounds", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "TINYSHAKESPEARE": str(corpus)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(proc.stdout.splitlines()[-1])
    assert result["segments"] == 2 and result["figure"] > 0  # steps 50-100 and 100-150
    (round_,) = result["rounds"]
    assert set(round_["ms_per_step"]) == {"llmforge", "reference"} and round_["spawned_first"] == "reference"


def test_reference_gpt_has_the_gpt_options_shape_and_trains():
    """The baseline counts as many parameters as llmforge's size model for each switch, and its loss falls."""
    torch = pytest.importorskip("torch")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import reference_gpt as ref
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    from llmforge.models.size import param_count
    from llmforge.spec.components import GPTModel

    llama = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, vocab_size=96, seq_length=16,
                 position_embedding_type="rope", normalization="RMSNorm", activation="swiglu", ffn_hidden_size=96,
                 add_bias_linear=False, untie_embeddings_and_output_weights=True)
    gpt2 = dict(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=96, seq_length=16, activation="gelu_tanh")
    for keys in (llama, gpt2):
        options = GPTModel(**keys)
        model = ref.ReferenceGPT(ref.Shape.of(options), seed=0)
        assert sum(p.numel() for p in model.parameters()) == param_count(options), keys
    model = ref.ReferenceGPT(ref.Shape.of(GPTModel(**llama)), seed=0)
    optimizer = ref.build_optimizer(model, lr=3e-3)
    # a learnable sequence: each token is the previous one plus one
    batch = (torch.arange(17).unsqueeze(0) + torch.randint(0, 96, (8, 1), generator=torch.Generator().manual_seed(0))) % 96
    losses = [ref.train_step(model, optimizer, list(batch.split(4)), lr=3e-3, precision=p) for p in ["fp32"] * 15 + ["bf16"] * 5]
    assert losses[-1] < 0.5 * losses[0], losses
