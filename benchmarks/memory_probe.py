"""What one micro batch really keeps for backward, module by module, against the planner's terms.

    python benchmarks/memory_probe.py SPEC [OVERRIDES...] [--out FILE]

Builds the spec's training model as a stage does (on CUDA where there is one, else on the
CPU), runs one forward of one micro batch under autograd's saved-tensor hooks and attributes
each distinct storage it keeps (parameters excluded) to the innermost module that saved it.
It prints one transformer layer's saved tensors (shape, dtype, bytes) and its total next to
`plan.memory.layer_activation_terms` for the same shape, what lies outside the layers
(embedding, final norm, output layer, loss), and the device's allocated bytes around the
forward and over one full training step. The GPU check runs it on the device
(`benchmarks/gpu_check.sh --memory-probe`): saved-tensor sizes differ between CPU and CUDA
kernels (fused RMSNorm, flash attention), so the plan's CUDA terms are measured there.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import weakref
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _layer_key(name: str) -> tuple[str, str]:
    """('layer', 'self_attention.linear_qkv') for 'module.decoder.layers.3.self_attention.linear_qkv';
    ('other', 'output_layer') outside the layers."""
    match = re.search(r"decoder\.layers\.(\d+)\.?(.*)$", name)
    if match:
        return f"layer{match.group(1)}", match.group(2) or "(layer)"
    return "other", re.sub(r"^(module\.)+", "", name) or "(model)"


def probe(spec_path: str, overrides: list[str], layer: int) -> dict[str, Any]:
    import torch

    from llmforge.models.gpt import build_gpt
    from llmforge.plan.memory import layer_activation_terms
    from llmforge.registry.manager import get_registry
    from llmforge.runtime.distributed import init_distributed
    from llmforge.runtime.optim import param_groups, wrap_optimizer
    from llmforge.runtime.step import TrainStep, autocast
    from llmforge.spec.validate import load_and_validate

    registry = get_registry()
    spec, _ = load_and_validate(spec_path, overrides, registry=registry, check_inputs=False)
    train = next(s for s in spec.stages if getattr(s, "train", None) is not None).train
    model_opts, par = spec.model, spec.parallelism
    ctx = init_distributed(par, seed=spec.seed)
    device = ctx.device
    on_gpu = device.type == "cuda"

    def allocated() -> int | None:
        return torch.cuda.memory_allocated() if on_gpu else None

    chunks = build_gpt(model_opts, par, precision=train.precision, seed=spec.seed)
    model = chunks[0]
    seq, mbs = model_opts.seq_length, train.micro_batch_size
    batch = torch.randint(0, model_opts.vocab_size, (mbs, seq + 1), generator=torch.Generator().manual_seed(0)).to(device)
    positions = torch.arange(seq, device=device).unsqueeze(0).expand(mbs, seq)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    stack: list[str] = []

    # Both hooks return None: a hook's return value would replace the module's input or output.
    def enter(name: str) -> None:
        stack.append(name)

    def leave() -> None:
        stack.pop()

    handles = []
    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(lambda m, a, name=name: enter(name)))
        handles.append(module.register_forward_hook(lambda m, a, o: leave(), always_call=True))
    records: list[tuple[str, weakref.ref, tuple, str]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in params:
            records.append((stack[-1] if stack else "(outside)", weakref.ref(t), tuple(t.shape), str(t.dtype).removeprefix("torch.")))
        return t

    base = allocated()
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    # The stage's own autocast (bf16-autocast's; a no-op otherwise): without it those layers run in fp32.
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast(train.precision, device)():
        loss = model(batch[:, :-1], positions, None, labels=batch[:, 1:]).sum()
    after_forward = allocated()
    forward_peak = torch.cuda.max_memory_allocated() if on_gpu else None
    for h in handles:
        h.remove()

    seen: set[int] = set()
    by_part: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    layer_tensors = []
    storage = None
    for module_name, ref, shape, dtype in records:
        # The storage alone, never the tensor: a saved tensor with a grad_fn held here would keep
        # the whole graph (every activation) alive into the training steps below.
        storage = tensor.untyped_storage() if (tensor := ref()) is not None else None
        del tensor
        if storage is None or storage.data_ptr() in seen:  # released during forward: not held for backward
            continue
        seen.add(storage.data_ptr())
        part, where = _layer_key(module_name)
        by_part[part][where] += storage.nbytes()
        if part == f"layer{layer}":
            layer_tensors.append({"module": where, "shape": list(shape), "dtype": dtype, "storage_bytes": storage.nbytes()})
    del loss, storage
    records.clear()
    totals = {part: sum(v.values()) for part, v in by_part.items()}
    layers = [v for k, v in totals.items() if k.startswith("layer")]
    planned = layer_activation_terms(model_opts, precision=train.precision, tensor=par.tensor_model_parallel_size,
                                     sequence_parallel=par.sequence_parallel, micro_batch_size=mbs, seq_length=seq,
                                     device="cuda" if on_gpu else "cpu")

    # One real training step: the static state (weights, grads, optimizer states) and the step's peak.
    groups = param_groups(chunks, weight_decay=getattr(train.optimizer, "weight_decay", 0.0))
    optimizer = wrap_optimizer(registry.build("optimizer", train.optimizer, params=groups), chunks, par)
    step = TrainStep(chunks, optimizer, parallelism_ctx=ctx, seq_length=seq, micro_batch_size=mbs, precision=train.precision,
                     clip_grad=train.clip_grad)
    micro_batches = train.global_batch_size // (mbs * ctx.dp_size)
    step_figures: dict[str, Any] = {"allocated_after_forward_released": allocated()}
    for index in range(2):  # the second step: the optimizer states exist from the start
        if on_gpu:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        before = allocated()
        step([batch.cpu()] * micro_batches, 1e-5)
        if on_gpu:
            torch.cuda.synchronize()
        step_figures[f"step{index + 1}"] = {"allocated_before": before, "allocated_after": allocated(),
                                            "peak": torch.cuda.max_memory_allocated() if on_gpu else None}
    return {
        "spec": spec_path, "overrides": overrides, "device": str(device), "precision": train.precision,
        "micro_batch_size": mbs, "seq_length": seq, "num_microbatches": micro_batches,
        "forward": {"allocated_before": base, "allocated_after": after_forward, "peak": forward_peak},
        "saved_by_part": totals, "saved_layers_mean": sum(layers) / len(layers) if layers else 0,
        "layer": layer, "layer_by_module": dict(by_part.get(f"layer{layer}", {})), "layer_tensors": layer_tensors,
        "outside_layers_by_module": dict(by_part.get("other", {})),
        "planned_layer_terms": planned, "planned_layer_total": sum(planned.values()),
        "steps": step_figures,
    }


def report(result: dict[str, Any]) -> None:
    gib = 2**30
    print(f"{result['spec']} {' '.join(result['overrides'])} on {result['device']} ({result['precision']}, micro batch "
          f"{result['micro_batch_size']} × {result['seq_length']})")
    print(f"layer {result['layer']} keeps {sum(t['storage_bytes'] for t in result['layer_tensors']) / gib:.3f} GiB; "
          f"mean over layers {result['saved_layers_mean'] / gib:.3f} GiB; planned {result['planned_layer_total'] / gib:.3f} GiB")
    for t in result["layer_tensors"]:
        print(f"  {t['module']:45s} {str(t['shape']):28s} {t['dtype']:9s} {t['storage_bytes'] / 2**20:10.1f} MiB")
    print("planned terms: " + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in result["planned_layer_terms"].items()))
    print("outside the layers: " + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in result["outside_layers_by_module"].items()))
    print(f"forward: {json.dumps(result['forward'])}; steps: {json.dumps(result['steps'])}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--layer", type=int, default=1, help="the layer whose tensors are listed (not the first: its input differs)")
    parser.add_argument("--out", type=Path, help="write the result as JSON here")
    args = parser.parse_args(argv)
    os.environ.setdefault("LLMFORGE_LEAN_LAYERS", "0")  # the plan models megatron's layers
    result = probe(args.spec, args.overrides, args.layer)
    report(result)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    from llmforge.runtime.distributed import shutdown

    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
