"""Measure what finetune stages really allocate, for the planner's finetune rows (one process per rank).

    python finetune_reality_worker.py CASES_JSON OUT_PREFIX

Each case is {"spec": path, "overrides": [...]} whose one stage is a finetune stage. This rank
builds the model as the stage does: `lora` attaches its adapters, `prompt_tuning` its soft
prompt (both freeze the model), `dpo` and `rl` build their frozen reference beside it. It counts
the bytes autograd saves in one micro batch of the rows the stage's step runs (2 per pair for
DPO, the stage's own length), runs one real TrainStep, and counts weight, gradient and
optimizer-state storage (reality_worker.py's counters), and the frozen models' weights.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from reality_worker import _storages, allocated_state_bytes, saved_activation_bytes  # noqa: E402


def run_case(case: dict) -> dict:
    import torch

    from llmforge.finetune.lora import attach_lora
    from llmforge.finetune.prompt import attach_soft_prompt
    from llmforge.models.gpt import build_gpt
    from llmforge.plan.finetune import frozen_models, rows_layout, sequence_length
    from llmforge.plan.memory import Layout
    from llmforge.registry.manager import get_registry
    from llmforge.runtime.distributed import init_distributed
    from llmforge.runtime.optim import param_groups, wrap_optimizer
    from llmforge.runtime.step import TrainStep
    from llmforge.spec.validate import load_and_validate

    registry = get_registry()
    spec, _ = load_and_validate(case["spec"], case.get("overrides", []), registry=registry, check_inputs=False)
    stage = spec.stages[0]
    train, model_opts, par = stage.train, spec.model, spec.parallelism
    ctx = init_distributed(par, seed=spec.seed)
    chunks = build_gpt(model_opts, par, precision=train.precision, seed=spec.seed)
    if stage.type == "lora":
        o = stage.lora
        attach_lora(chunks, targets=list(o.target_modules), rank=o.rank, alpha=o.alpha, dropout=o.dropout, seed=spec.seed)
    elif stage.type == "prompt_tuning":
        attach_soft_prompt(chunks, num_virtual_tokens=stage.prompt_tuning.num_virtual_tokens, init="random", token_ids=[], seed=spec.seed)
    frozen = [build_gpt(model_opts, par, precision=train.precision, seed=spec.seed) for _ in range(frozen_models(stage))]
    for model in frozen:
        for chunk in model:
            chunk.eval().requires_grad_(False)

    seq = sequence_length(model_opts, stage)
    mbs = rows_layout(Layout.from_spec(par, train), stage).micro_batch_size
    batch = torch.randint(0, model_opts.vocab_size, (mbs, seq + 1), generator=torch.Generator().manual_seed(0))
    out = {"rank": ctx.rank, "tp_rank": ctx.tp_rank, "pp_rank": ctx.pp_rank, "dp_rank": ctx.dp_rank}
    positions = torch.arange(seq).unsqueeze(0).expand(mbs, seq)
    out["saved_activations"] = saved_activation_bytes(chunks[0], batch[:, :-1], batch[:, 1:], positions, train.precision)

    groups = param_groups(chunks, weight_decay=getattr(train.optimizer, "weight_decay", 0.0))
    optimizer = wrap_optimizer(registry.build("optimizer", train.optimizer, params=groups), chunks, par)
    step = TrainStep(chunks, optimizer, parallelism_ctx=ctx, seq_length=seq, micro_batch_size=mbs, precision=train.precision,
                     clip_grad=train.clip_grad)
    step([batch] * (train.global_batch_size // (train.micro_batch_size * ctx.dp_size)), 1e-4)
    out.update(allocated_state_bytes(chunks, optimizer))
    out["frozen_models"] = sum(_storages(p for model in frozen for chunk in model for p in chunk.parameters()).values())
    out["kv_cache"] = rollout_cache_bytes(chunks, stage, seq, ctx, train.precision) if stage.type == "rl" else 0
    return out


def rollout_cache_bytes(chunks, stage, length: int, ctx, precision: str) -> int:
    """The KV cache the policy's sampler allocates for one rollout of this replica's completions, prompts filling L."""
    from llmforge.runtime import serve
    from llmforge.runtime.step import autocast

    made = []

    class Recording(serve.StageDecoder):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    serve.StageDecoder = Recording
    rows = stage.train.global_batch_size // ctx.dp_size
    server = serve.ModelServer(chunks, autocast=autocast(precision, ctx.device))
    server.generate([[1] * (length - stage.max_new_tokens)] * rows, max_new_tokens=stage.max_new_tokens, shared=False)
    return sum(t.untyped_storage().nbytes() for d in made for c in d.caches.values() for t in (c.key, c.value))


def main() -> None:
    cases, prefix = json.loads(open(sys.argv[1]).read()), sys.argv[2]
    results = [run_case(case) for case in cases]
    with open(f"{prefix}.{results[0]['rank']}.json", "w") as f:
        json.dump(results, f)
    from llmforge.runtime.distributed import shutdown

    shutdown()


if __name__ == "__main__":
    main()
