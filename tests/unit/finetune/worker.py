"""The finetune steps at every layout, for test_layouts.py (a test helper, not a test).

`python -m torch.distributed.run --nproc-per-node=2 worker.py --job pair --out DIR` trains
each case at TP=2, TP=2 with sequence parallelism, DP=2 and PP=2; `python worker.py --job single
--out DIR` trains them in one process, then loads the 2-process LoRA checkpoints (adapters
alone, merged, and merged on the fly) into plain one-process models. Every rank writes
`<job>_rank<r>.json` with losses, grad norms and whether the frozen weights stayed
bit-identical; the tests compare the files. Every case also trains in megatron's bf16 (TP=2 with
sequence parallelism and PP=2 in the pair job, one process in the single job: `<case>_<layout>_bf16`),
and the single job folds the bf16 LoRA checkpoint of TP=2 + SP into a bf16 and an fp32 model.
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

SEED = 77
MICRO, SEQ, VOCAB, MICRO_BATCHES, STEPS = 2, 16, 128, 2, 3
LR = {"reward_model": 0.05}  # SGD learning rate per case; 0.5 elsewhere
# bf16 runs take a tenth: at the fp32 rates a step amplifies bf16's rounding (1e-3 in a loss) into
# 1e-1 of the full finetunes' eval losses after 3 steps, layouts and fp32 alike, and compares nothing.
BF16_LR_SCALE = 0.1
SHAPES = {
    "llama": {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "num_query_groups": 2, "ffn_hidden_size": 96,
              "vocab_size": VOCAB, "seq_length": SEQ, "position_embedding_type": "rope", "normalization": "RMSNorm",
              "activation": "swiglu", "add_bias_linear": False, "untie_embeddings_and_output_weights": True},
    "gpt2": {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "ffn_hidden_size": 128, "vocab_size": VOCAB,
             "seq_length": SEQ, "position_embedding_type": "learned_absolute", "normalization": "LayerNorm", "activation": "gelu_tanh",
             "add_bias_linear": True},
}
LAYOUTS = {
    "single": {},
    "tp2": {"tensor_model_parallel_size": 2, "nproc_per_node": 2},
    "tp2_sp": {"tensor_model_parallel_size": 2, "sequence_parallel": True, "nproc_per_node": 2},
    "dp2": {"nproc_per_node": 2},
    "pp2": {"pipeline_model_parallel_size": 2, "nproc_per_node": 2},
}
PAIR_LAYOUTS = ["tp2", "tp2_sp", "dp2", "pp2"]
LORA = {"targets": ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"], "rank": 4, "alpha": 8.0}
VIRTUAL = 3  # soft-prompt tokens
CASES = ["lora_llama", "lora_gpt2", "prompt", "dpo", "reward_model", "policy_gradient"]
BF16_PAIR_LAYOUTS = ["tp2_sp", "pp2"]


def _rows(step: int, count: int, width: int):
    """Arithmetic runs mod VOCAB with a loss mask over their second half (a 'response')."""
    import torch

    generator = torch.Generator().manual_seed(1000 + step)
    start = torch.randint(0, VOCAB, (count, 1), generator=generator)
    stride = torch.randint(1, 4, (count, 1), generator=generator)
    tokens = (start + stride * torch.arange(width + 1)) % VOCAB
    masks = torch.zeros(count, width)
    masks[:, width // 2:] = 1.0
    return tokens, masks


def _share(items: list, ctx) -> list:
    per_rank = len(items) // ctx.dp_size
    return items[ctx.dp_rank * per_rank:(ctx.dp_rank + 1) * per_rank]


def _global_batch(case: str, step: int):
    """(micro batches, their masks or rollouts) of one step, the same for every layout."""
    import torch

    from llmforge.finetune.prompt import shift_batch
    from llmforge.finetune.steps import Rollout

    rows = MICRO * MICRO_BATCHES
    if case in ("dpo", "reward_model"):
        chosen, masks = _rows(step, rows, SEQ)
        rejected = chosen.flip(1).clone()  # the same tokens backwards: a worse 'response'
        if case == "reward_model":
            masks = torch.zeros(rows, SEQ)
            masks[:, -1] = 1.0
        tokens = torch.cat([chosen, rejected], dim=1)
        return list(tokens.split(MICRO)), list(torch.cat([masks, masks], dim=1).split(MICRO))
    tokens, masks = _rows(step, rows, SEQ)
    if case == "prompt":
        tokens, masks = shift_batch(tokens, masks, VIRTUAL, 0)
    if case == "policy_gradient":
        generator = torch.Generator().manual_seed(2000 + step)
        advantages = torch.randn(rows, generator=generator)
        reference = -4.0 + 0.5 * torch.randn(rows, SEQ, generator=generator)
        extras = [Rollout(m, a, None, r) for m, a, r in zip(masks.split(MICRO), advantages.split(MICRO), reference.split(MICRO))]
        return list(tokens.split(MICRO)), extras
    return list(tokens.split(MICRO)), list(masks.split(MICRO))


def _model(shape: str, parallelism, precision: str = "fp32"):
    from llmforge.models.gpt import build_gpt
    from llmforge.spec.components import GPTModel

    return build_gpt(GPTModel(**SHAPES[shape]), parallelism, precision=precision, seed=SEED)


def _snapshot(chunks) -> dict:
    from llmforge.models.init import unwrap

    return {n: p.detach().clone() for chunk in chunks for n, p in unwrap(chunk).named_parameters() if not p.requires_grad}


def _train(case: str, layout: str, out: Path, precision: str = "fp32") -> dict:
    import torch
    import torch.distributed as dist

    from llmforge.finetune import lora, prompt, reward_model, steps
    from llmforge.finetune.checkpoints import LORA_META, PartialCheckpoints
    from llmforge.models.init import unwrap
    from llmforge.runtime.distributed import init_distributed
    from llmforge.runtime.optim import build_sgd, wrap_optimizer
    from llmforge.runtime.sharded_io import save_sharded
    from llmforge.runtime.step import TrainStep
    from llmforge.spec.components import SGD
    from llmforge.spec.schema import ParallelismConfig

    parallelism = ParallelismConfig(**LAYOUTS[layout])
    ctx = init_distributed(parallelism, seed=SEED)
    shape = "gpt2" if case == "lora_gpt2" else "llama"
    chunks = _model(shape, parallelism, precision)
    step_cls, length = TrainStep, SEQ
    name = f"{case}_{layout}" + ("_bf16" if precision == "bf16" else "")
    base_dir = out / f"base_{name}"
    if case.startswith("lora"):
        if ctx.rank == 0:
            (base_dir / "model").mkdir(parents=True, exist_ok=True)
        dist.barrier()
        save_sharded(base_dir / "model", chunks, None, {})
        lora.attach_lora(chunks, targets=LORA["targets"], rank=LORA["rank"], alpha=LORA["alpha"], dropout=0.0, seed=SEED)
    elif case == "prompt":
        prompt.attach_soft_prompt(chunks, num_virtual_tokens=VIRTUAL, init="vocab", token_ids=[5, 6, 7], seed=SEED)
    elif case == "reward_model":
        reward_model.attach_reward_head(chunks, seed=SEED)
        step_cls = steps.RewardModelStep
    elif case == "dpo":
        from llmforge.runtime.serve import ModelServer

        reference = ModelServer(_model("llama", parallelism, precision))
        step_cls = functools.partial(steps.PreferenceStep, reference=reference, beta=0.5, loss="sigmoid")
    elif case == "policy_gradient":
        step_cls = functools.partial(steps.PolicyGradientStep, clip_epsilon=0.2, kl_coef=0.1, updates=2)
    frozen = _snapshot(chunks)
    lr = LR.get(case, 0.5) * (BF16_LR_SCALE if precision == "bf16" else 1.0)
    optimizer = wrap_optimizer(build_sgd(SGD(lr=lr), model_chunks=chunks), chunks, parallelism)
    # What the optimizer steps: the parameters themselves, or under bf16 their fp32 master weights.
    stepped = [p.detach().clone() for group in optimizer.optimizer.param_groups for p in group["params"]]
    step = step_cls(chunks, optimizer, parallelism_ctx=ctx, seq_length=length, micro_batch_size=MICRO, precision=precision, clip_grad=None)
    # Under PP a rank holds one stage: a soft prompt lives on the first, a reward head on the last.
    trainable = {n: p.detach().clone() for n, p in unwrap(chunks[0]).named_parameters() if p.requires_grad}
    results = []
    for s in range(STEPS):
        tokens, extras = _global_batch(case, s)
        results.append(step(_share(tokens, ctx), lr, _share(extras, ctx)))
    tokens, extras = _global_batch(case, 99)
    loss_sum, count = step.eval_loss(_share(tokens, ctx), _share(extras, ctx))
    after = _snapshot(chunks)
    record = {
        "losses": [r.loss for r in results], "grad_norms": [r.grad_norm for r in results], "eval": loss_sum / count,
        "frozen_count": len(frozen), "frozen_identical": all(torch.equal(frozen[n], after[n]) for n in frozen),
        "trainable": sorted(trainable), "trainable_moved": all(not torch.equal(trainable[n], p.detach())
                                                             for n, p in unwrap(chunks[0]).named_parameters() if p.requires_grad),
        "dtypes": sorted({str(p.dtype) for p in unwrap(chunks[0]).parameters()}),
        "optimizer_dtypes": sorted({str(p.dtype) for group in optimizer.optimizer.param_groups for p in group["params"]}),
        "stepped_moved": all(not torch.equal(before, p.detach()) for before, p in
                             zip(stepped, [p for group in optimizer.optimizer.param_groups for p in group["params"]], strict=True)),
    }
    if case.startswith("lora"):
        meta = {"base": str(base_dir), "rank": LORA["rank"], "alpha": LORA["alpha"], "target_modules": LORA["targets"], "seed": SEED}
        saves = (("adapters_only_bf16", False),) if precision == "bf16" else (("adapters_only", False), ("merged", True))
        for kind, final in saves:
            target = out / f"{case}_{layout}_{kind}"
            if ctx.rank == 0:
                target.mkdir(parents=True, exist_ok=True)
            dist.barrier()
            PartialCheckpoints(folder="adapters", select=lora.is_adapter_key, meta_name=LORA_META, meta=meta, rank=ctx.rank,
                               merge_final=True).save(target, chunks, optimizer, final=final)
            dist.barrier()
    return record


def _plain_eval(model, case: str) -> float:
    """Masked mean loss of the eval batch through a plain (not DDP) model."""
    import torch

    tokens, masks = _global_batch(case, 99)
    total, count = 0.0, 0.0
    with torch.no_grad():
        for t, m in zip(tokens, masks):
            positions = torch.arange(SEQ).expand(t.shape[0], -1)
            loss = model(t[:, :-1], positions, None, labels=t[:, 1:])
            total += float((loss * m).sum())
            count += float(m.sum())
    return total / count


def _load_bf16_lora(out: Path) -> dict:
    """The bf16 LoRA checkpoint of TP=2 + SP (its base saved in bf16) folded into one-process models of either precision."""
    from llmforge.finetune.checkpoints import load_weights
    from llmforge.spec.schema import ParallelismConfig

    loaded = {}
    for precision in ("bf16", "fp32"):
        for case in ("lora_llama", "lora_gpt2"):
            shape = "gpt2" if case == "lora_gpt2" else "llama"
            folded = _model(shape, ParallelismConfig(), precision)
            load_weights(out / f"{case}_tp2_sp_adapters_only_bf16", folded)
            loaded[f"{case}_into_{precision}"] = _plain_eval(folded[0], case)
    return loaded


def _load_two_process_checkpoints(out: Path) -> dict:
    """The 2-process LoRA checkpoints in one process: adapters into an adapted model, the merged
    model into a plain one, and the adapters-only checkpoint merged on the fly (init_from's path)."""
    from llmforge.finetune import lora
    from llmforge.finetune.checkpoints import load_weights
    from llmforge.runtime.distributed import init_distributed
    from llmforge.runtime.sharded_io import load_sharded
    from llmforge.spec.schema import ParallelismConfig

    parallelism = ParallelismConfig()
    init_distributed(parallelism, seed=SEED)
    loaded = {}
    for case in ("lora_llama", "lora_gpt2"):
        shape = "gpt2" if case == "lora_gpt2" else "llama"
        loaded[f"{case}_base"] = _plain_eval(_model(shape, parallelism)[0], case)
        for layout in PAIR_LAYOUTS:
            adapted = _model(shape, parallelism)
            lora.attach_lora(adapted, targets=LORA["targets"], rank=LORA["rank"], alpha=LORA["alpha"], dropout=0.0, seed=SEED + 1)
            load_sharded(out / f"{case}_{layout}_adapters_only" / "adapters", adapted, None, select=lora.is_adapter_key)
            merged = _model(shape, parallelism)
            load_weights(out / f"{case}_{layout}_merged", merged)
            folded = _model(shape, parallelism)
            load_weights(out / f"{case}_{layout}_adapters_only", folded)
            loaded[f"{case}_{layout}"] = {"adapters": _plain_eval(adapted[0], case), "merged": _plain_eval(merged[0], case),
                                          "folded": _plain_eval(folded[0], case),
                                          "folded_has_adapters": any(lora.is_adapter_key(n) for n, _ in folded[0].named_parameters())}
    return loaded


def main() -> None:
    import torch.distributed as dist

    from llmforge.runtime.distributed import shutdown

    parser = argparse.ArgumentParser()
    parser.add_argument("--job", choices=["pair", "single"], required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    layouts = PAIR_LAYOUTS if args.job == "pair" else ["single"]
    results = {f"{case}_{layout}": _train(case, layout, args.out) for layout in layouts for case in CASES}
    for layout in BF16_PAIR_LAYOUTS if args.job == "pair" else ["single"]:
        results.update({f"{case}_{layout}_bf16": _train(case, layout, args.out, "bf16") for case in CASES})
    if args.job == "single":
        results["loaded"] = _load_two_process_checkpoints(args.out)
        results["loaded_bf16"] = _load_bf16_lora(args.out)
    rank = dist.get_rank()
    (args.out / f"{args.job}_rank{rank}.json").write_text(json.dumps(results))
    shutdown()


if __name__ == "__main__":
    main()
