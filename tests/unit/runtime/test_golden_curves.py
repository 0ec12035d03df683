"""Golden loss curves: the tiny shape's per-step train loss, pretrain then SFT, against a committed record.

`SPEC` (the tiny spec's model shape, char tokenizer, the synthetic `tasks` source as text:
nothing outside the spec, and no `${stdlib:}`) runs through `llmforge run`, fp32, one
thread, seed 1234: pretrain 50 steps, then SFT 20 steps from the pretrain checkpoint. Every
step's train loss is read from `metrics.jsonl` and compared with `golden/tiny.json`, so any
change of numerics (data, init, loss, optimizer, schedule, clipping, kernels) fails here
until it is reviewed and the record refreshed:

    python tests/unit/runtime/test_golden_curves.py --refresh

`--threads N` (without `--refresh`) runs the spec at N threads and prints its largest
difference from the record. Measured so (torch 2.13, megatron-core 0.16.1, an AVX-512 CPU),
max |loss - record| over the steps of pretrain / SFT:

    2 threads                                  0 / 0 (bitwise the same as 1 thread)
    3 threads                                  3.5e-5 / 2.1e-5
    kernels held to AVX2, 1 or 2 threads       9.0e-5 / 5.8e-5
    kernels held to AVX2, 3 threads            2.8e-5 / 2.1e-5
    kernels held to SSE4.2, 1 thread           1.7e-6 / 9.0e-7

("held to" = `ATEN_CPU_CAPABILITY`, `MKL_ENABLE_INSTRUCTIONS`, `ONEDNN_MAX_CPU_ISA`: the kernels
another CPU would run.) TOLERANCE is 5.5x the largest of those. Changes tried by hand move the
curve 60x more than TOLERANCE or further (pretrain weight_decay 0.1 -> 0.09: 3.3e-2; clip_grad,
warmup, decay groups, SFT lr), except a clip value in SFT, where every step clips and Adam
ignores the common scale (1.0 -> 0.9: 2e-6). The
learning rates are modest on purpose: at the tiny spec's (2e-3, then 1e-3) a few SFT
batches, those holding rare 3-digit answers (per-sample grad norm 12 where the others have
0.3), change their loss by 2e-2 under the same rounding changes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
GOLDEN = Path(__file__).with_name("golden") / "tiny.json"
REFRESH = "python tests/unit/runtime/test_golden_curves.py --refresh"
RECORD_VERSION = 1
THREADS = 1
TOLERANCE = 5e-4  # absolute, per step: see the module docstring
STAGES = {"pretrain": 50, "sft": 20}

SPEC = """\
schema_version: 1
name: golden-tiny
seed: 1234
tokenizer: {name: char, add_eos: true}    # SFT pads with the end-of-document token
data:
  sources:
    tasks: {name: tasks, tasks: [add2, add3], num_examples: 4000, seed: 3, format: text}
  split: {by: document, val_fraction: 0.02}
model:                                     # the tiny spec's shape, with the char tokenizer's vocabulary
  name: gpt
  num_layers: 4
  hidden_size: 256
  num_attention_heads: 4
  ffn_hidden_size: 704
  vocab_size: 64
  seq_length: 64
  position_embedding_type: rope
  normalization: RMSNorm
  activation: swiglu
  add_bias_linear: false
stages:
  - name: prepare
    type: prepare
  - name: pretrain
    type: pretrain
    train:
      micro_batch_size: 4
      global_batch_size: 8
      max_steps: 50
      optimizer: {name: adamw, lr: 1.0e-3, betas: [0.9, 0.95], weight_decay: 0.1}
      lr_schedule: {name: cosine, warmup_steps: 5, min_lr: 1.0e-4}
      precision: fp32
    evaluators: []
  - name: sft
    type: sft
    init_from: pretrain
    data:
      sources:
        addition: {name: tasks, tasks: [add2], num_examples: 400, seed: 1}
      val_fraction: 0
    chat_template: plain
    max_seq_length: 16
    train:
      micro_batch_size: 16
      global_batch_size: 32
      max_steps: 20
      optimizer: {name: adamw, lr: 2.0e-4, betas: [0.9, 0.98], weight_decay: 0.0}
      lr_schedule: {name: cosine, warmup_steps: 5, min_lr: 2.0e-5}
      precision: fp32
    evaluators: []
logging: {log_interval: 1, sample_tokens: 0, tensorboard: false}
checkpoint: {interval: 1000, keep_last: 1}
"""

# Variables of a calling process that must not reach the run: a launcher's, or a fault injection.
_DROP_PREFIXES = ("LLMFORGE_", "SLURM_", "TORCHELASTIC_")
_DROP = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def spec_sha256() -> str:
    return hashlib.sha256(SPEC.encode()).hexdigest()


def run_curves(work: Path, *, threads: int = THREADS) -> dict:
    """SPEC through `llmforge run` at `threads` threads: each stage's per-step train loss and the versions it ran with."""
    spec = work / "golden-tiny.yaml"
    spec.write_text(SPEC)
    run_dir = work / "run"
    env = {k: v for k, v in os.environ.items() if k not in _DROP and not k.startswith(_DROP_PREFIXES)}
    env.update(OMP_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore", PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-m", "llmforge.cli", "run", str(spec), "--run-dir", str(run_dir)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"llmforge run exited {done.returncode}:\n{(done.stdout + done.stderr)[-4000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    curves = {}
    for stage, steps in STAGES.items():
        train = [r for r in rows if r["kind"] == "train" and r["stage"] == stage]
        logged = [r["step"] for r in train]
        if logged != list(range(1, steps + 1)):
            raise RuntimeError(f"{run_dir / 'metrics.jsonl'}: stage {stage!r} logged steps {logged}, expected 1..{steps}")
        curves[stage] = [r["loss"] for r in train]
    versions = json.loads((run_dir / "env.json").read_text())
    return {"versions": {name: versions[name] for name in ("torch", "megatron-core")}, "curves": curves}


def differences(recorded: dict, measured: dict) -> dict[str, list[float]]:
    """|measured - recorded| per stage and step."""
    return {stage: [abs(a - b) for a, b in zip(measured["curves"][stage], recorded["curves"][stage], strict=True)]
            for stage in STAGES}


def drift_report(recorded: dict, measured: dict, tolerance: float = TOLERANCE) -> str | None:
    """None when every step is within `tolerance` of the record; else what drifted, where, and with which versions."""
    lines = []
    for stage, diffs in differences(recorded, measured).items():
        beyond = [step for step, d in enumerate(diffs, start=1) if d > tolerance]
        if beyond:
            shown = ", ".join(f"step {s}: {measured['curves'][stage][s - 1]:.6f} (recorded {recorded['curves'][stage][s - 1]:.6f})"
                              for s in beyond[:5])
            more = f" and {len(beyond) - 5} more" if len(beyond) > 5 else ""
            lines.append(f"{stage}: {len(beyond)} of {len(diffs)} steps differ by more than {tolerance:g} "
                         f"(max {max(diffs):.3g}): {shown}{more}")
    if not lines:
        return None
    changed = [f"{name} {recorded['versions'][name]} -> {measured['versions'][name]}"
               for name in recorded["versions"] if recorded["versions"][name] != measured["versions"].get(name)]
    lines.append(f"versions differ from the record's: {'; '.join(changed)}" if changed
                 else f"same versions as the record ({', '.join(f'{k} {v}' for k, v in recorded['versions'].items())})")
    lines.append(f"if the change is intended, refresh the record and review its diff: {REFRESH}")
    return "\n".join(lines)


def read_record() -> dict:
    return json.loads(GOLDEN.read_text())


def write_record(measured: dict) -> None:
    record = {
        "version": RECORD_VERSION,
        "about": "Per-step train loss of SPEC in tests/unit/runtime/test_golden_curves.py (fp32, one thread, seed 1234), "
                 "read from metrics.jsonl of `llmforge run`. Refresh only for an intended change of numerics.",
        "refresh": REFRESH,
        "threads": THREADS,
        "spec_sha256": spec_sha256(),
        "versions": measured["versions"],
        "curves": measured["curves"],
    }
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    tmp = GOLDEN.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(GOLDEN)


# --- the test ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_loss_curves_match_the_golden_record(tmp_path):
    recorded = read_record()
    assert recorded["version"] == RECORD_VERSION and recorded["threads"] == THREADS
    assert recorded["spec_sha256"] == spec_sha256(), f"SPEC changed since the record was written; refresh it: {REFRESH}"
    assert {stage: len(curve) for stage, curve in recorded["curves"].items()} == STAGES
    measured = run_curves(tmp_path)
    report = drift_report(recorded, measured)
    assert report is None, report


def test_a_drift_names_the_steps_the_versions_and_the_refresh_command():
    recorded = {"versions": {"torch": "2.13.0+cpu", "megatron-core": "0.16.1"},
                "curves": {"pretrain": [4.0] * STAGES["pretrain"], "sft": [1.5] * STAGES["sft"]}}
    same = {"versions": dict(recorded["versions"]), "curves": {k: [x + TOLERANCE / 2 for x in v] for k, v in recorded["curves"].items()}}
    assert drift_report(recorded, same) is None
    drifted = {"versions": {"torch": "2.14.0+cpu", "megatron-core": "0.16.1"},
               "curves": {"pretrain": list(recorded["curves"]["pretrain"]), "sft": [1.5] * 19 + [1.6]}}
    report = drift_report(recorded, drifted)
    assert "sft: 1 of 20 steps differ by more than" in report and "step 20: 1.600000 (recorded 1.500000)" in report
    assert "pretrain" not in report
    assert "versions differ from the record's: torch 2.13.0+cpu -> 2.14.0+cpu\n" in report  # megatron-core did not change
    assert report.endswith(REFRESH)
    drifted["versions"]["torch"] = "2.13.0+cpu"
    assert "same versions as the record (torch 2.13.0+cpu, megatron-core 0.16.1)" in drift_report(recorded, drifted)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Run the golden spec; with --refresh, rewrite the record from a one-thread run.")
    parser.add_argument("--refresh", action="store_true", help=f"rewrite {GOLDEN.relative_to(ROOT)} (after reviewing the change)")
    parser.add_argument("--threads", type=int, default=THREADS, help="threads for the run (compare only; the record is one thread)")
    args = parser.parse_args()
    if args.refresh and args.threads != THREADS:
        parser.error(f"the record is written from a {THREADS}-thread run")
    with tempfile.TemporaryDirectory(prefix="golden-tiny-") as work:
        measured = run_curves(Path(work), threads=args.threads)
    if args.refresh:
        write_record(measured)
        print(f"wrote {GOLDEN.relative_to(ROOT)} ({', '.join(f'{k} {v}' for k, v in measured['versions'].items())})")
    else:
        recorded = read_record()
        worst = {stage: max(diffs) for stage, diffs in differences(recorded, measured).items()}
        print(f"{args.threads} thread(s): max |loss - recorded| " + ", ".join(f"{stage} {d:.3g}" for stage, d in worst.items())
              + f" (tolerance {TOLERANCE:g})")
        print(drift_report(recorded, measured) or "within tolerance")
