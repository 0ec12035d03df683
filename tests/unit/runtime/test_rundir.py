"""Run-dir rules: refuse reuse, resume, overwrite, spec-change diff, and the lock."""

from __future__ import annotations

import subprocess
import sys

import pytest

from llmforge.runtime.metrics import read_rows, truncate_rows
from llmforge.runtime.rundir import RunDir, spec_diff
from llmforge.spec.errors import UserError

SPEC = {"name": "t", "model": {"num_layers": 2}, "stages": [{"name": "a"}]}


def _start(path, spec=SPEC, **kw):
    run = RunDir(path)
    opts = {"resume": False, "overwrite": False, "allow_spec_change": False, **kw}
    resuming = run.prepare(spec, **opts)
    run.write_records(spec, {"plan_hash": "x"}, {})
    return run, resuming


def test_second_run_into_used_dir_is_refused_with_hint(tmp_path):
    run, resuming = _start(tmp_path / "r")
    run.unlock()
    assert resuming is False
    with pytest.raises(UserError) as e:
        _start(tmp_path / "r")
    assert "--resume" in str(e.value) and "--overwrite" in str(e.value)


def test_resume_and_overwrite(tmp_path):
    run, _ = _start(tmp_path / "r")
    (run.path / "keep.txt").write_text("x")
    run.unlock()
    run2, resuming = _start(tmp_path / "r", resume=True)
    assert resuming and (run2.path / "keep.txt").exists()
    run2.unlock()
    run3, resuming = _start(tmp_path / "r", overwrite=True)
    assert not resuming and not (run3.path / "keep.txt").exists()


def test_changed_spec_on_resume_is_refused_with_diff(tmp_path):
    run, _ = _start(tmp_path / "r")
    run.unlock()
    changed = {**SPEC, "model": {"num_layers": 4}}
    with pytest.raises(UserError) as e:
        _start(tmp_path / "r", spec=changed, resume=True)
    assert "model.num_layers: 2 -> 4" in str(e.value)
    _, resuming = _start(tmp_path / "r", spec=changed, resume=True, allow_spec_change=True)
    assert resuming


def test_lock_stops_a_second_live_run(tmp_path):
    run, _ = _start(tmp_path / "r")
    code = (
        "import sys\nfrom llmforge.runtime.rundir import RunDir\nfrom llmforge.spec.errors import UserError\n"
        f"try:\n    RunDir({str(tmp_path / 'r')!r}).lock()\nexcept UserError as e:\n    print(e); sys.exit(3)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 3 and "in use by a live run" in proc.stdout
    run.unlock()


def test_spec_diff_lists_fields():
    assert spec_diff({"a": {"b": 1}, "c": [1, 2]}, {"a": {"b": 2}, "c": [1]}) == ["a.b: 1 -> 2", "c[1]: 2 -> '<absent>'"]


def test_metrics_truncate_drops_rows_past_checkpoint_and_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"stage": "pre", "step": 5}] + [{"stage": "train", "step": s} for s in (10, 20, 30)]
    path.write_text("".join(__import__("json").dumps(r) + "\n" for r in rows) + '{"stage": "train", "st')
    truncate_rows(path, "train", 20)
    assert read_rows(path) == rows[:3]
