"""The sbatch script of `llmforge launch slurm`, read as Slurm and bash will (its signal path runs in tests/fault/test_slurm.py)."""

from __future__ import annotations

import json
import math
import re
import subprocess
from pathlib import Path

import pytest

from llmforge.cli import main
from llmforge.runtime.slurm import parse_time
from llmforge.spec.errors import UserError

ROOT = Path(__file__).resolve().parents[3]
SEVEN_B = str(ROOT / "specs" / "7b-pretrain.yaml")


@pytest.mark.parametrize("text, seconds", [
    ("30", 1800), ("30:15", 1815), ("48:00:00", 172800), ("2-00", 172800), ("1-12:30", 131400), ("1-00:00:10", 86410),
])
def test_slurm_time_formats(text, seconds):
    assert parse_time(text) == seconds


@pytest.mark.parametrize("text", ["2d", "1:2:3:4", "", "0", "-1"])
def test_a_time_slurm_would_not_take_is_refused(text):
    with pytest.raises(UserError, match="Slurm time limit|no time at all"):
        parse_time(text)


def _write(tmp_path, capsys, *args: str) -> tuple[str, str]:
    out = tmp_path / "job.sbatch"
    assert main(["launch", "slurm", SEVEN_B, "-o", str(out), *args]) == 0
    return out.read_text(), capsys.readouterr().out


def _sbatch(script: str) -> dict[str, str]:
    return dict(m.groups() for m in re.finditer(r"^#SBATCH --([\w-]+)=?(.*)$", script, flags=re.M))


def test_the_script_signals_every_rank_before_the_limit_and_requeues_itself(tmp_path, capsys):
    script, _ = _write(tmp_path, capsys)
    options = _sbatch(script)
    # The step form: every process of the step (torchrun agents and ranks); "B:" would reach the batch shell only.
    assert options["signal"] == "TERM@210" and options["time"] == "48:00:00"
    assert options["requeue"] == "" and options["open-mode"] == "append"
    assert "export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=150" in script  # torchrun waits out preempt_timeout (120 s) + 30
    assert 'srun python -m torch.distributed.run' in script  # no --kill-on-bad-exit: every agent exits non-zero after a SIGTERM
    assert f'-m llmforge.cli run {SEVEN_B} --run-dir "$RUN_DIR" --resume-or-start || code=$?' in script
    assert 'next=$(llmforge status "$RUN_DIR" --field next' in script and 'scontrol requeue "$SLURM_JOB_ID"' in script
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


@pytest.mark.parametrize("time", ["48:00:00", "12:00:00"])
def test_the_header_counts_the_jobs_the_planned_run_needs(tmp_path, capsys, time):
    script, printed = _write(tmp_path, capsys, "--time", time, "--signal-margin", "300")
    assert main(["plan", SEVEN_B, "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    pretrain = next(s for s in plan["stages"] if s["name"] == "pretrain")
    jobs = math.ceil(pretrain["total_time_s"] / (parse_time(time) - 300))
    assert pretrain["total_time_s"] / 86400 == pytest.approx(8.5, abs=0.05)  # the 7B run
    assert "# Planned training time on h100-80gb at 40% MFU (`llmforge plan`): pretrain 8.5 days, sft unknown (" in script
    line = f"that is at least {jobs} job(s): this one and at least {jobs - 1} requeue(s)."
    assert line in script and line in printed
    assert _sbatch(script)["signal"] == "TERM@300"


def test_a_margin_that_cannot_hold_the_final_checkpoint_is_refused(tmp_path, capsys):
    out = str(tmp_path / "job.sbatch")
    assert main(["launch", "slurm", SEVEN_B, "-o", out, "--signal-margin", "60"]) == 2
    assert "less than checkpoint.preempt_timeout 120 s" in capsys.readouterr().err
    assert main(["launch", "slurm", SEVEN_B, "-o", out, "--time", "3:00", "--signal-margin", "300"]) == 2
    assert "does not fit the time limit" in capsys.readouterr().err
    assert not Path(out).exists()
