"""A/B: autograd accumulating into DDP's main grads with the TP=1 identities skipped (this tree, issue 31)
against megatron's per-parameter hooks and mappings, in one process; shakespeare-char shape, fp32, 12x64.
Also checks the losses and weights match bitwise.

    python benchmarks/cpu_grads_ab.py      # ROUNDS=10 by default; OMP_NUM_THREADS=1 on a shared machine
"""
import os, statistics, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))
import torch, yaml
import workloads
from llmforge.models import cpu_compat
from llmforge.runtime import optim

spec = yaml.safe_load(open(ROOT / "specs" / "shakespeare-char.yaml"))
work = workloads.Workload("sc", {k: v for k, v in spec["model"].items() if k != "name"}, 12, 1, 1e-3)
cpu_compat.install()
from megatron.core.tensor_parallel import layers  # noqa: E402

mappings = {n: getattr(layers, n) for n in ("copy_to_tensor_model_parallel_region", "reduce_from_tensor_model_parallel_region")}
grads_in_place = optim._grads_in_place


def variant(new: bool) -> None:
    for name, mapping in mappings.items():
        setattr(layers, name, mapping if new else mapping.__wrapped__)
    optim._grads_in_place = grads_in_place if new else (lambda *args: False)


built = {}
for new in (False, True):
    variant(new)
    torch.manual_seed(0)
    built[new] = workloads.build_llmforge(work, precisions=("fp32",))
    assert built[new]["chunks"]["fp32"][0].grads_in_place == new
runs = {new: [built[new]["step"]["fp32"](workloads.batches(work, seed=i)) for i in range(10)] for new in (False, True)}
weights = {new: [p.detach() for p in built[new]["chunks"]["fp32"][0].parameters()] for new in (False, True)}
print("losses bitwise equal:", runs[False] == runs[True], "weights bitwise equal:",
      all(torch.equal(a, b) for a, b in zip(weights[False], weights[True], strict=True)))
data = workloads.batches(work)
times = {False: [], True: []}
for rnd in range(int(os.environ.get("ROUNDS", 10))):
    for new in ((False, True) if rnd % 2 == 0 else (True, False)):
        variant(new)
        start = time.perf_counter()
        for _ in range(20):
            built[new]["step"]["fp32"](data)
        times[new].append((time.perf_counter() - start) / 20 * 1e3)
old, new = statistics.median(times[False]), statistics.median(times[True])
print(f"hooks {old:.2f} ms/step, in place {new:.2f} ms/step, ratio {new / old:.3f}")
