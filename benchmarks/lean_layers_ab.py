"""A/B/C in one process: llmforge's step with lean layers (models.lean), with megatron's own block
forward, and the plain-PyTorch reference (reference_gpt), on the shakespeare-char shape, fp32, 12x64.
Rounds alternate the order, so a noisy host weighs on all three alike; prints median ms/step and
the ratios (issue 31).

    OMP_NUM_THREADS=1 python benchmarks/lean_layers_ab.py      # ROUNDS=10 by default
"""
import os, statistics, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))
import torch, yaml
import workloads

spec = yaml.safe_load(open(ROOT / "specs" / "shakespeare-char.yaml"))
work = workloads.Workload("sc", {k: v for k, v in spec["model"].items() if k != "name"}, 12, 1, 1e-3)
torch.manual_seed(0)
ours = workloads.build_llmforge(work, precisions=("fp32",))
decoder = ours["chunks"]["fp32"][0].module.decoder  # inside DDP
theirs = workloads.build_reference(work)
arms = {"lean": ("lean", True), "megatron": ("lean", False), "reference": None}


def step(arm: str):
    if arm == "reference":
        return theirs["step"]["fp32"]
    decoder.lean = arm == "lean"
    return ours["step"]["fp32"]


data = workloads.batches(work)
for arm in arms:  # warm up
    for _ in range(5):
        step(arm)(data)
times = {arm: [] for arm in arms}
order = list(arms)
for rnd in range(int(os.environ.get("ROUNDS", 10))):
    for arm in order[rnd % 3:] + order[:rnd % 3]:
        run = step(arm)
        start = time.perf_counter()
        for _ in range(20):
            run(data)
        times[arm].append((time.perf_counter() - start) / 20 * 1e3)
med = {arm: statistics.median(t) for arm, t in times.items()}
print(" ".join(f"{arm} {ms:.2f} ms/step" for arm, ms in med.items()))
print(f"lean/megatron {med['lean'] / med['megatron']:.3f}  lean/reference {med['lean'] / med['reference']:.3f}  "
      f"megatron/reference {med['megatron'] / med['reference']:.3f}")
