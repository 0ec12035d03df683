"""Measure what llmforge really allocates, for the planner's reality tests (one process per rank).

    python reality_worker.py CASES_JSON OUT_PREFIX

CASES_JSON is a list of {"spec": path, "overrides": [...]}. For each case this rank builds
the model with `build_gpt`, counts the bytes autograd saves for backward in one micro
batch (storages counted once, parameters excluded), then wraps the optimizer as training
does, runs one real TrainStep, and counts parameter, gradient and optimizer-state bytes (the
optimizer's own fp32 master weights of bf16 parameters among its states).
It writes OUT_PREFIX.<rank>.json. Under a launcher the environment (RANK, WORLD_SIZE,
MASTER_PORT, ...) says where this rank sits; alone it is one process.
"""

from __future__ import annotations

import contextlib
import json
import sys
import weakref


def _storages(tensors) -> dict[int, int]:
    out = {}
    for t in tensors:
        storage = t.untyped_storage()
        out[storage.data_ptr()] = storage.nbytes()
    return out


def saved_activation_bytes(model, tokens, labels, positions, precision: str) -> int:
    """Bytes of the distinct storages autograd keeps for backward after one forward."""
    import torch

    params = set(_storages(model.parameters()))
    packed: list[weakref.ref] = []

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            packed.append(weakref.ref(t))
        return t

    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16-autocast" else contextlib.nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        loss = model(tokens, positions, None, labels=labels).sum()
    # A tensor saved and then released during forward (a discarded graph) is not held.
    alive = [t for r in packed if (t := r()) is not None]
    total = sum(_storages(alive).values())
    del loss, alive
    return total


def allocated_state_bytes(ddp_chunks, optimizer) -> dict[str, int]:
    """Parameter, gradient and optimizer-state bytes: distinct storages, each counted once."""
    params = _storages(p for chunk in ddp_chunks for p in chunk.parameters())
    grads: dict[int, int] = {}
    for chunk in ddp_chunks:
        for buffer in getattr(chunk, "buffers", []) + getattr(chunk, "expert_parallel_buffers", []):
            grads.update(_storages([buffer.grad_data]))
    grads.update({k: v for k, v in _storages(p.grad for c in ddp_chunks for p in c.parameters() if p.grad is not None).items()
                  if k not in params})
    # An MoE model's optimizer chains a dense and an expert one (runtime.optim).
    inners = [getattr(o, "optimizer", o) for o in getattr(optimizer, "chained_optimizers", [optimizer])]
    states = _storages(t for inner in inners for state in inner.state.values() for t in state.values() if hasattr(t, "untyped_storage"))
    # What the torch optimizer steps, where it is not the model's parameters: fp32 master weights of bf16 ones.
    states.update(_storages(p for inner in inners for group in inner.param_groups for p in group["params"]))
    states = {k: v for k, v in states.items() if k not in params and k not in grads}
    return {"weights": sum(params.values()), "gradients": sum(grads.values()), "optimizer_states": sum(states.values())}


def run_case(case: dict) -> dict:
    import torch

    from llmforge.models.gpt import build_gpt
    from llmforge.registry.manager import get_registry
    from llmforge.runtime.distributed import init_distributed
    from llmforge.runtime.optim import param_groups, wrap_optimizer
    from llmforge.runtime.step import TrainStep
    from llmforge.spec.validate import load_and_validate

    registry = get_registry()
    spec, _ = load_and_validate(case["spec"], case.get("overrides", []), registry=registry, check_inputs=False)
    stage = next(s for s in spec.stages if getattr(s, "train", None) is not None)
    train, model_opts, par = stage.train, spec.model, spec.parallelism
    ctx = init_distributed(par, seed=spec.seed)
    chunks = build_gpt(model_opts, par, precision=train.precision, seed=spec.seed)

    seq, mbs = model_opts.seq_length, train.micro_batch_size
    batch = torch.randint(0, model_opts.vocab_size, (mbs, seq + 1), generator=torch.Generator().manual_seed(0))
    out = {"rank": ctx.rank, "tp_rank": ctx.tp_rank, "pp_rank": ctx.pp_rank, "dp_rank": ctx.dp_rank}
    if ctx.pp_size == 1:
        positions = torch.arange(seq).unsqueeze(0).expand(mbs, seq)
        out["saved_activations"] = saved_activation_bytes(chunks[0], batch[:, :-1], batch[:, 1:], positions, train.precision)

    groups = param_groups(chunks, weight_decay=getattr(train.optimizer, "weight_decay", 0.0))
    torch_opt = registry.build("optimizer", train.optimizer, params=groups)
    optimizer = wrap_optimizer(torch_opt, chunks, par)  # wraps the chunks in megatron DDP, in place
    step = TrainStep(chunks, optimizer, parallelism_ctx=ctx, seq_length=seq, micro_batch_size=mbs,
                     precision=train.precision, clip_grad=train.clip_grad)
    micro_batches = train.global_batch_size // (mbs * ctx.dp_size)
    result = step([batch] * micro_batches, 1e-4)
    out.update(allocated_state_bytes(chunks, optimizer), loss=result.loss)
    return out


def main() -> None:
    cases, prefix = json.loads(open(sys.argv[1]).read()), sys.argv[2]
    results = [run_case(case) for case in cases]
    rank = results[0]["rank"] if results else 0
    with open(f"{prefix}.{rank}.json", "w") as f:
        json.dump(results, f)
    from llmforge.runtime.distributed import shutdown

    shutdown()


if __name__ == "__main__":
    main()
