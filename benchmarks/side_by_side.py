"""The steady-state step rate of `llmforge run specs/shakespeare-char.yaml` against time_to_loss's reference loop (issue 31).

    OMP_NUM_THREADS=1 python benchmarks/side_by_side.py [--steps 600] [--rounds 4] [--llmforge-env KEY=VALUE ...]

time_to_loss's figure mixes start-up, evaluations and the step rate, and its whole-run pairs
move by ±3% with this host. This measures the step rate alone, as the two runs meet it side by
side: both train the recipe without evaluations, each process pinned to its own core, and each
reports every 50 steps (llmforge's log line, the reference's `step N/M`). A segment's ratio is
llmforge's seconds for those 50 steps over the reference's for the same 50; the figure is the
median over every segment of every round, and rounds swap the cores and which side is spawned
first (two copies of one program read 1–3% apart by core and by spawn order here). Start-up is
not in it: the first 50 steps are not compared (llmforge's clock starts with its stage, before
the model is built; the reference's at its first step). `--llmforge-env` sets variables
for llmforge's run only (a lever to try). Not part of `benchmarks/run.py`: a diagnostic, ~50 s
a round.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import time_to_loss_bench as ttl  # noqa: E402

TICK = 50
_STARTED = re.compile(r"pretrain stage started|^training started")
_STEP = re.compile(r"step (\d+)/\d+")


def _ticks(argv: list[str], env: dict[str, str], core: int, out: dict, key: str) -> None:
    """Run `argv` on `core`; {step: seconds since its first training step} into out[key]."""
    proc = subprocess.Popen(argv, cwd=ttl.ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    os.sched_setaffinity(proc.pid, {core})
    start, ticks = None, {}
    for line in proc.stdout:
        if start is None and _STARTED.search(line):
            start = time.perf_counter()
        elif start is not None and (m := _STEP.search(line)) and int(m[1]) % TICK == 0:
            ticks[int(m[1])] = time.perf_counter() - start
    if proc.wait() == 0:
        out[key] = ticks  # else the key stays missing and the round reports the failure


def side_by_side(steps: int, rounds: int, llmforge_env: dict[str, str]) -> dict:
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        raise SystemExit("side_by_side needs two cores (one for each run)")
    ttl._compile_bytecode()
    # One process on one core each (this tool compares the steady-state step), not the CPU
    # layout `llmforge run` would pick for both cores (runtime.cpu_layout).
    recipe = ttl._recipe(False, {"LLMFORGE_AUTO_LAYOUT": "0"})
    recipe["train"] = {**recipe["train"], "max_steps": steps, "eval_interval": 10 * steps}
    recipe["tick"] = TICK
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "TINYSHAKESPEARE": str(ttl._corpus()),
           "LLMFORGE_AUTO_LAYOUT": "0"}
    script = Path(sys.executable).with_name("llmforge")
    llmforge = [str(script)] if script.exists() else [sys.executable, "-m", "llmforge"]
    segments, per_round = [], []
    for rnd in range(rounds):
        ours_core, theirs_core = (cores[0], cores[1]) if rnd % 2 == 0 else (cores[1], cores[0])
        llmforge_first = (rnd // 2) % 2 == 1
        with tempfile.TemporaryDirectory(prefix="llmforge-sbs-") as tmp:
            ours = [*llmforge, "run", str(ttl.SPEC), "--run-dir", str(Path(tmp) / "run"), f"stages.1.train.max_steps={steps}",
                    f"stages.1.train.eval_interval={10 * steps}", f"logging.log_interval={TICK}"]
            theirs = [sys.executable, str(HERE / "time_to_loss_bench.py"), "--reference", json.dumps(recipe)]
            out: dict = {}
            runs = [(ours, {**env, **llmforge_env}, ours_core, "llmforge"), (theirs, env, theirs_core, "reference")]
            threads = [threading.Thread(target=_ticks, args=(argv, run_env, core, out, key))
                       for argv, run_env, core, key in (runs if llmforge_first else runs[::-1])]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        if set(out) != {"llmforge", "reference"}:
            failed = " and ".join(sorted({"llmforge", "reference"} - set(out)))
            raise RuntimeError(f"the {failed} run failed; run it alone to see why")
        common = sorted(set(out["llmforge"]) & set(out["reference"]))
        ratios = [(out["llmforge"][b] - out["llmforge"][a]) / (out["reference"][b] - out["reference"][a]) for a, b in zip(common, common[1:])]
        segments += ratios
        per_round.append({"llmforge_core": ours_core, "spawned_first": "llmforge" if llmforge_first else "reference",
                          "median_segment_ratio": round(statistics.median(ratios), 3),
                          # from the first report on: before it llmforge's clock also holds the stage's build
                          "ms_per_step": {side: round((out[side][common[-1]] - out[side][common[0]]) / (common[-1] - common[0]) * 1e3, 2)
                                          for side in out}})
        print(f"round {rnd}: llmforge on core {ours_core}, {per_round[-1]['spawned_first']} spawned first: "
              f"median segment ratio {per_round[-1]['median_segment_ratio']}  {per_round[-1]['ms_per_step']} ms/step", flush=True)
    return {"figure": round(statistics.median(segments), 3), "segments": len(segments), "rounds": per_round,
            "llmforge_env": llmforge_env, "steps": steps}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--llmforge-env", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    result = side_by_side(args.steps, args.rounds, dict(kv.split("=", 1) for kv in args.llmforge_env))
    print(f"llmforge's step over the reference's, side by side: {result['figure']} (median of {result['segments']} segments)")
    print(json.dumps(result))
