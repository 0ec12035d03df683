"""A/B: this tree's CPU layer (optimizer step outside CudaToCpuMode, no size-one all-reduces) against the
previous behaviour restored in the same process; shakespeare-char shape, fp32, 12x64. Also checks the losses match bitwise.

    python benchmarks/cpu_layer_ab.py      # ROUNDS=8 by default; OMP_NUM_THREADS=1 on a shared machine

Issue 31's per-step levers (docs/performance.md, the time_to_loss bullet) were measured with it.
"""
import importlib, os, sys, time, statistics
from pathlib import Path
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))
import torch, yaml
import workloads
spec = yaml.safe_load(open(ROOT / "specs" / "shakespeare-char.yaml"))
model = {k: v for k, v in spec["model"].items() if k != "name"}
work = workloads.Workload("sc", model, 12, 1, 1e-3)
from llmforge.models import cpu_compat
from megatron.core.optimizer import optimizer as mo
new_ours = workloads.build_llmforge(work, precisions=("fp32",))
step = new_ours["step"]["fp32"]
data = workloads.batches(work)
mods = [importlib.import_module(n) for n in ("megatron.core.tensor_parallel.cross_entropy", "megatron.core.distributed.finalize_model_grads")]
new_torch = [m.torch for m in mods]
classes = (mo.MegatronOptimizer, mo.MixedPrecisionOptimizer, mo.FP32Optimizer, mo.Float16OptimizerWithFloat16Params, mo.ChainedOptimizer)
new_methods = {(k, n): f for k in classes for n, f in vars(k).items() if n in cpu_compat._STEP_METHODS}
old_methods = {key: cpu_compat.on_cpu(f) for key, f in new_methods.items()}
def variant(name):
    for (k, n), f in (old_methods if name in ("old", "coll_only") else new_methods).items(): setattr(k, n, f)
    for m, t in zip(mods, new_torch): m.torch = torch if name in ("old", "optimizer_only") else t
# bitwise: same init twice, 10 steps each way
def losses(name):
    variant(name)
    torch.manual_seed(0)
    built = workloads.build_llmforge(work, precisions=("fp32",))
    return [built["step"]["fp32"](workloads.batches(work, seed=i)) for i in range(10)]
lo, ln = losses("old"), losses("new")
print("losses bitwise equal:", lo == ln, lo[-1], ln[-1])
names = ["old", "optimizer_only", "coll_only", "new"]
for n in names:
    variant(n); [step(data) for _ in range(5)]
times = {n: [] for n in names}
for rnd in range(int(os.environ.get("ROUNDS", 8))):
    for n in (names if rnd % 2 == 0 else names[::-1]):
        variant(n)
        t = time.perf_counter()
        for _ in range(20): step(data)
        times[n].append((time.perf_counter() - t) / 20 * 1e3)
base = statistics.median(times["old"])
for n in names:
    m = statistics.median(times[n]); print(f"{n:5s} median {m:.2f} ms/step  ratio to old: {m/base:.3f}  all {['%.1f'%x for x in times[n]]}")
