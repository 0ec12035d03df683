"""What every training stage shares: model, optimizer, schedule, step, evaluation, checkpoints and the loop.

Pretraining and the finetune stages differ in their data and in what `StageHooks` says:
how init_from's weights load, what is attached to the model, the step's loss, what a
checkpoint holds, and what the evaluators may ask of the model. Everything else is here,
once, so a stage module reads as its data plus its hooks.
"""

from __future__ import annotations

import dataclasses
import math
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmforge.runtime.context import RunContext
from llmforge.spec.errors import UserError

if TYPE_CHECKING:
    from llmforge.runtime.step import TrainStep

# The MFU peaks this process has named in the log (runtime.device.rank_peak).
_PEAKS_SHOWN: set[str] = set()


class StageHooks:
    """What a training stage may change in `build_training`; the defaults are pretraining's.

    Subclass it and override what the stage changes (each finetune stage does):

    - `init_weights(source, chunks)`: load init_from's checkpoint into plain chunks. Default:
      a full checkpoint only (`finetune.checkpoints.AnyCheckpointInit` also reads LoRA ones).
    - `adapt(chunks)`: after init, before the optimizer sees the parameters: adapters, a soft
      prompt, a reward head, frozen weights.
    - `step_class()`: the TrainStep subclass (or a partial of one) carrying the stage's loss.
    - `save(tmp, chunks, optimizer, final=)` / `load(step_dir, chunks, optimizer)`: what the
      stage's checkpoints hold (default: the whole model and optimizer under `model/`). For a
      checkpoint written in the background (`checkpoint.async_save`), `save` runs inside
      `sharded_io.deferred_writes`: `save_sharded`/`write_sharded` copy what they save and write
      it later; any other file it writes is written at once (it is the step's own state).
    - `evaluation(chunks, step, server)`: EvalContext fields to set or replace (log-probabilities,
      rewards, generation behind a soft prompt); `server` is the stage's `runtime.serve.ModelServer`
      over `chunks`, which works at every layout.
    """

    def init_weights(self, source: Path, chunks: list) -> None:
        from llmforge.runtime.sharded_io import load_sharded

        if not (Path(source) / "model").is_dir():
            raise UserError(f"{source} holds no full model checkpoint (no model/ directory)", "point init_from at a training stage's checkpoint")
        load_sharded(Path(source) / "model", chunks, None)

    def adapt(self, chunks: list) -> None:
        pass

    def step_class(self) -> type[TrainStep] | Any:
        from llmforge.runtime.step import TrainStep

        return TrainStep

    def save(self, tmp: Path, chunks: list, optimizer, *, final: bool) -> None:
        from llmforge.runtime.sharded_io import save_sharded

        (tmp / "model").mkdir(parents=True, exist_ok=True)
        save_sharded(tmp / "model", chunks, optimizer, {})

    def load(self, step_dir: Path, chunks: list, optimizer) -> None:
        from llmforge.runtime.sharded_io import load_sharded

        load_sharded(step_dir / "model", chunks, optimizer)

    def evaluation(self, chunks: list, step: TrainStep, server) -> dict[str, Any]:
        return {}


def build_training(context: RunContext, stage, *, loader, val_loader_fn, seq_length: int | None = None,
                   hooks: StageHooks | None = None) -> dict[str, Any]:
    """Model, optimizer, schedule, step, checkpoints and the loop for a training stage.

    Args:
        loader: `next_global_batch()` gives a list of micro batches, or a batch with `.tokens`
            and `.masks` (loss masks: finetune data, padded documents).
        val_loader_fn: a fresh val loader, or None when the stage has no val split (val-based
            evaluation and the val preview are then skipped).
        seq_length: tokens per sample when not model.seq_length (finetune `max_seq_length`).
        hooks: what the stage changes (`StageHooks`); None = pretraining's defaults.
    """
    from llmforge.spec.stages import val_split_readers

    hooks = hooks or StageHooks()
    readers = val_split_readers(stage)
    if val_loader_fn is None and readers:
        # Refused before any work: an evaluator failing at every evaluation would only be logged.
        raise UserError(f"stage {stage.name!r} has no val split, but its {', '.join(readers)} evaluator reads it",
                        "give the stage a val split (val_fraction > 0), or drop val_loss from its evaluators")
    from llmforge.plan.finetune import flops_per_token, row_length
    from llmforge.runtime.checkpoint import CheckpointManager
    from llmforge.runtime.device import memory_mb, rank_peak
    from llmforge.runtime.evaluate import EvalContext, MetricKeys, build_evaluators, val_batches_of
    from llmforge.runtime.faults import install_loss_faults
    from llmforge.runtime.guards import SpikeGuard
    from llmforge.runtime.optim import param_groups, wrap_optimizer
    from llmforge.runtime.rng import RngState
    from llmforge.runtime.serve import ModelServer, greedy_functions
    from llmforge.runtime.step import serving_context
    from llmforge.runtime.train import Loop, total_steps

    spec, registry, par = context.spec, context.registry, context.parallel()
    train = stage.train
    model_opts = spec.model
    fp8 = {"fp8": options} if (options := train.fp8_options()) else {}  # only under fp8: other models need not take it
    chunks = registry.build("model", model_opts, parallelism=spec.parallelism, precision=train.precision, seed=spec.seed, **fp8)
    if stage.init_from:
        source = context.final_checkpoint(stage.init_from)
        hooks.init_weights(source, chunks)
        context.log(f"[{stage.name}] initialized from {source}")
    hooks.adapt(chunks)
    opt_opts = train.optimizer
    groups = param_groups(chunks, weight_decay=getattr(opt_opts, "weight_decay", 0.0),
                          decay_embeddings=getattr(opt_opts, "decay_embeddings", True))
    torch_opt = registry.build("optimizer", opt_opts, params=groups)
    optimizer = wrap_optimizer(torch_opt, chunks, spec.parallelism)  # wraps `chunks` in megatron DDP in place
    total = total_steps(train, samples_per_epoch=loader.samples_per_epoch, tokens_per_sample=loader.tokens_per_sample, loader=loader)
    schedule = registry.build("lr_schedule", train.lr_schedule, peak_lr=opt_opts.lr, total_steps=total)
    seq_length = seq_length or model_opts.seq_length
    step_fn = hooks.step_class()(chunks, optimizer, parallelism_ctx=par, seq_length=seq_length,
                                      micro_batch_size=train.micro_batch_size, precision=train.precision, clip_grad=train.clip_grad)
    guard = SpikeGuard(train.spike, train.on_spike)
    step_fn.update_guard = guard.allows  # judged before the optimizer step, so a skipped spike never lands
    if par.is_last_stage:  # the reliability suite's NaN and spike injection; a no-op unless asked for
        install_loss_faults(step_fn.chunks[-1], lambda: loop.counters.step + 1)
    tokenizer = context.tokenizer()
    # Scoring and generation for evaluators, the preview and the stage's hooks: every layout.
    server = ModelServer(chunks, autocast=serving_context(train.precision, par.device, chunks), documents=getattr(step_fn, "documents", None))

    def train_step(batch, lr: float):
        if getattr(batch, "segments", None) is not None:  # packed finetune rows
            return step_fn(batch.tokens, lr, batch.masks, segments=batch.segments)
        if hasattr(batch, "masks"):
            return step_fn(batch.tokens, lr, batch.masks)
        return step_fn(batch, lr)

    def val_loss(iters: int) -> tuple[float, int]:
        val = val_loader_fn()
        total_loss, total_tokens = 0.0, 0
        with step_fn.evaluating():  # one switch to eval mode for every batch
            for _ in range(iters):
                batch = val.next_global_batch()
                if getattr(batch, "segments", None) is not None:  # packed finetune rows, scored as they train
                    s, n = step_fn.eval_loss(batch.tokens, batch.masks, segments=batch.segments)
                else:
                    s, n = step_fn.eval_loss(batch.tokens, batch.masks) if hasattr(batch, "masks") else step_fn.eval_loss(batch)
                total_loss += s
                total_tokens += n
        return total_loss / max(total_tokens, 1), total_tokens

    metrics = context.metrics(stage.name)
    eval_ctx = EvalContext(stage=stage, tokenizer=tokenizer, val_loss=val_loss, **greedy_functions(server, tokenizer), server=server,
                           log=context.log, eval_iters=train.eval_iters, score=step_fn.eval_loss,
                           text=lambda tag, text, step: metrics.text(f"{stage.name}/{tag}", text, step) if par.rank == 0 else None,
                           micro_batch_size=train.micro_batch_size, seq_length=seq_length, max_positions=model_opts.max_positions,
                           val_batches=None if val_loader_fn is None else val_batches_of(val_loader_fn, server),
                           token_logprobs=lambda rows: server.logprobs(rows, micro_batch_size=train.micro_batch_size),
                           predictions=lambda rows: server.predictions(rows, micro_batch_size=train.micro_batch_size),
                           rank=par.rank)
    eval_ctx = dataclasses.replace(eval_ctx, **hooks.evaluation(chunks, step_fn, server))
    evaluators = build_evaluators(registry, stage.evaluators, eval_ctx)
    keep = MetricKeys(stage, registry, context.log)

    if val_loader_fn is None and spec.logging.sample_prompt is None and spec.logging.sample_tokens > 0:
        context.log(f"[{stage.name}] no val split: the text preview of a val sample is skipped")

    def evaluate(step: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for i, (options, ev) in enumerate(zip(stage.evaluators, evaluators)):
            try:
                keep.add(out, i, ev.evaluate(step))
            except Exception as e:  # an evaluation failure never costs training: logged whole, training goes on
                from llmforge.registry.errors import one_line

                reg = registry.get("evaluator", options.name)
                context.log(f"[{stage.name}] step {step}: evaluator {options.name!r} ({reg.provider} {reg.version}) failed: "
                            f"{one_line(e)}; training continues (traceback in run.log)")
                context.log.detail(traceback.format_exc())
        # The metrics are shown as soon as they are known, before the text preview is generated
        # (a nanoGPT-style loop prints its val loss as the val pass ends); val_loss first:
        # benchmarks/time_to_loss_bench.py reads it from this line.
        shown = [f"val_loss {out['val_loss']:.4f} (ppl {out.get('val_ppl', math.nan):.2f})"] if "val_loss" in out else []
        shown += [f"{k} {v:.4g}" for k, v in out.items()
                  if k not in ("val_loss", "val_ppl") and isinstance(v, (int, float)) and not isinstance(v, bool)]
        if shown:
            context.log(f"[{stage.name}] step {step}: {', '.join(shown)}")
        sample = eval_ctx.sample(spec.logging.sample_prompt, spec.logging.sample_tokens, val_loader_fn)
        if sample is not None and par.rank == 0:
            metrics.text(f"{stage.name}/sample", f"```\n{sample}\n```", step)
            context.log(f"[{stage.name}] sample @ {step}: {sample[:200]!r}")
        return out

    def save_model(tmp: Path) -> None:
        hooks.save(tmp, chunks, optimizer, final=loop.counters.step >= total)

    stage_model = None
    background = spec.checkpoint.async_save
    if background is None:  # by device: see the field's description
        background = par.device.type == "cuda"
    if background:
        from llmforge.runtime.sharded_io import SnapshotPool, deferred_writes

        pool = SnapshotPool()  # host copies of the saved state, reused from one save to the next

        def stage_model(tmp: Path):
            with deferred_writes(pool) as deferred:
                save_model(tmp)
            return deferred

    def load_model(step_dir: Path) -> None:
        hooks.load(step_dir, chunks, optimizer)

    def any_rank(flag: bool) -> bool:
        if par.world_size == 1:
            return flag
        import torch
        import torch.distributed as dist

        from llmforge.runtime import host_collectives

        vote = torch.tensor([float(flag)], device=par.device)
        host_collectives.all_reduce(vote, op=dist.ReduceOp.MAX)
        return bool(vote.item())

    ckpt = CheckpointManager(context.run.checkpoints(stage.name), keep_last=spec.checkpoint.keep_last,
                             on_corrupt=spec.checkpoint.on_corrupt, rank=par.rank, barrier=context.barrier, log=context.log,
                             world_size=par.world_size, any_rank=any_rank)

    router_metrics = None
    if getattr(model_opts, "num_moe_experts", None):
        from llmforge.models.moe import RouterMetrics

        router_metrics = RouterMetrics(chunks, model_opts, micro_batches_per_step=train.global_batch_size // (train.micro_batch_size * par.dp_size),
                                       device=par.device)
        counted_step = train_step

        def train_step(batch, lr: float):
            router_metrics.steps += 1
            return counted_step(batch, lr)

    tokens_per_step = train.global_batch_size * seq_length
    peak, peak_source = rank_peak(train.precision, par.device, local_world_size=par.local_world_size)
    if peak_source not in _PEAKS_SHOWN:  # once a process: every stage of a run divides by the same peak
        _PEAKS_SHOWN.add(peak_source)
        context.log(f"[{stage.name}] mfu is against {peak_source}")
    loop = Loop(stage=stage.name, train=train, total=total, step_fn=train_step, loader=loader, schedule=schedule,
                evaluate=evaluate, metrics=metrics, log=context.log, ckpt=ckpt, checkpoint_interval=spec.checkpoint.interval,
                save_model=save_model, load_model=load_model, rng=RngState(spec.seed, world_size=par.world_size), tokens_per_step=tokens_per_step,
                flops_per_token=flops_per_token(model_opts, stage, row_length(stage, seq_length)), peak_flops=peak,
                rank=par.rank, memory_fn=memory_mb, log_interval=spec.logging.log_interval, guard=guard, any_rank=any_rank,
                preempt_timeout=spec.checkpoint.preempt_timeout, world_size=par.world_size,
                train_metrics=None if router_metrics is None else router_metrics.read, stage_model=stage_model,
                peak_source=peak_source)
    return {"loop": loop, "ckpt": ckpt, "metrics": metrics, "chunks": chunks, "step": step_fn, "eval": eval_ctx, "server": server}
