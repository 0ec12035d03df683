"""Every parallel layout trains like one process: the same weights, losses and checkpoints.

As Megatron's own tests do: CPU, gloo, fp32, SGD (or AdamW at a small lr), fixed batches.
Two jobs run under the real launcher (torchrun) and do all the work; this file is also
their worker (`python -m torch.distributed.run ... test_step_parity.py --job pair`):

- `pair` (2 processes): TP=2, PP=2, PP=2 with virtual stages, DP=2, TP=2 with sequence
  parallel and recompute, the DistributedOptimizer, bf16 autocast, a non-finite step, and saving
  checkpoints at TP=2, PP=2 and DP=2 (loading the TP=2 one at PP=2); the same layouts again in
  megatron's bf16, and a bf16 checkpoint at TP=2 and at DP=2 with the DistributedOptimizer.
- `single` (1 process): the reference runs (fp32 and bf16), recompute with dropout, loading the
  2-process checkpoints at TP=1 and into the other precision, a bf16 resume, and the 200-step
  bf16 and fp32 curves of a 2-layer, 128-wide model.

The tests then compare the numbers the jobs wrote.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

SEED = 1234
PROMPT = [5, 6, 7, 8, 9]  # odd length: padded to a multiple of TP under sequence parallelism
STEPS = 6
MICRO_BATCH, SEQ, VOCAB, MICRO_BATCHES = 2, 32, 256, 4
CLIP_GRAD = 0.5  # below the grad norms seen here, so clipping is part of every step
TOLERANCE = 2e-6  # "to about 1e-6": float reduction order differs between layouts
# Megatron's bf16 (bf16 weights and activations, fp32 main grads and master weights): a layout
# changes where results are rounded to bf16's 8 bits (TP rounds each rank's partial row-parallel
# output before the all-reduce, where one process rounds the whole sum once; PP with tied
# embeddings sums the embedding's two gradients in fp32, one process in bf16). Over STEPS steps
# the losses moved by at most 1.8e-4 (gpt PP=2; bf16 itself is 3.4e-4 from fp32 on the same
# steps, and the losses fall 6e-2): 5e-4 is about 3x that. Layouts that round nowhere else
# (PP without tied embeddings) must match exactly.
BF16_TOLERANCE = 5e-4
# The 200-step curves (2 layers, hidden 128, AdamW 1e-3; loss 5.56 -> 0.12): bf16 rounds each
# weight to 2^-9 relative where fp32 keeps 2^-24, so the curves drift apart as they descend. The
# largest step gap seen was 6.2e-3 (bf16 autocast: 4.6e-3); a step may differ by 1.5e-2, the
# last 20 steps' mean by 3%.
CURVE_STEPS, CURVE_STEP_TOLERANCE, CURVE_TAIL_RELATIVE = 200, 1.5e-2, 0.03

# The two shapes, at toy size: GPT-2's switches (LayerNorm, tanh-GELU, learned positions,
# tied embeddings, biases) and Llama's (RMSNorm, SwiGLU, RoPE, GQA, untied, no biases).
SHAPES = {
    "gpt": {"preset": "gpt2-124m", "num_layers": 4},
    "llama": {"preset": "llama2-7b", "num_layers": 2, "num_query_groups": 2},
}


# --- the worker ----------------------------------------------------------------------------


def _options(shape: str, **overrides):
    from llmforge.models.presets import shrink
    from llmforge.spec.components import GPTModel

    spec = dict(SHAPES[shape])
    return GPTModel(**shrink(spec.pop("preset"), **spec, **overrides))


def _sequences(generator, count: int):
    """Arithmetic runs mod VOCAB (random start and stride): learnable, so the loss falls."""
    import torch

    start = torch.randint(0, VOCAB, (count, 1), generator=generator)
    stride = torch.randint(1, 4, (count, 1), generator=generator)
    return (start + stride * torch.arange(SEQ + 1)) % VOCAB


def _global_batch(step: int):
    import torch

    generator = torch.Generator().manual_seed(100 + step)
    return list(_sequences(generator, MICRO_BATCHES * MICRO_BATCH).split(MICRO_BATCH))


def _loss_masks(step: int):
    """About 70% of targets trained on, a different count in every micro batch (as in SFT)."""
    import torch

    generator = torch.Generator().manual_seed(500 + step)
    return list((torch.rand(MICRO_BATCHES * MICRO_BATCH, SEQ, generator=generator) < 0.7).float().split(MICRO_BATCH))


def _eval_batch():
    import torch

    return list(_sequences(torch.Generator().manual_seed(999), 2 * MICRO_BATCH).split(MICRO_BATCH))


def _share(batches, ctx):
    per_rank = len(batches) // ctx.dp_size
    return batches[ctx.dp_rank * per_rank : (ctx.dp_rank + 1) * per_rank]


class Trainer:
    """One layout: model, optimizer and TrainStep, built the way the pretrain stage does."""

    def __init__(self, shape: str, *, optimizer: str = "sgd", lr: float = 0.5, precision: str = "fp32", seed: int = SEED, model=None, **parallelism):
        from llmforge.models.gpt import build_gpt
        from llmforge.runtime.distributed import init_distributed
        from llmforge.runtime.optim import build_adamw, build_sgd, wrap_optimizer
        from llmforge.runtime.step import TrainStep
        from llmforge.spec.components import SGD, AdamW
        from llmforge.spec.schema import ParallelismConfig

        self.parallelism = ParallelismConfig(**parallelism)
        self.ctx = init_distributed(self.parallelism, seed=seed)
        self.lr = lr
        self.chunks = build_gpt(_options(shape, **(model or {})), self.parallelism, precision=precision, seed=seed)
        self.initial = gathered_weights(self.chunks)
        if optimizer == "sgd":
            torch_optimizer = build_sgd(SGD(lr=lr), model_chunks=self.chunks)
        elif optimizer == "sgd_momentum":
            torch_optimizer = build_sgd(SGD(lr=lr, momentum=0.9), model_chunks=self.chunks)
        else:
            torch_optimizer = build_adamw(AdamW(lr=lr, weight_decay=0.01), model_chunks=self.chunks)
        self.optimizer = wrap_optimizer(torch_optimizer, self.chunks, self.parallelism)
        self.step = TrainStep(self.chunks, self.optimizer, parallelism_ctx=self.ctx, seq_length=SEQ, micro_batch_size=MICRO_BATCH, precision=precision, clip_grad=CLIP_GRAD)

    def train(self, steps: range, masked: bool = False) -> dict:
        results = [
            self.step(_share(_global_batch(s), self.ctx), self.lr, loss_masks=_share(_loss_masks(s), self.ctx) if masked else None)
            for s in steps
        ]
        return {"losses": [r.loss for r in results], "grad_norms": [r.grad_norm for r in results], "nonfinite": [r.nonfinite for r in results], "tokens": [r.num_tokens for r in results]}

    def eval(self) -> float:
        loss_sum, tokens = self.step.eval_loss(_share(_eval_batch(), self.ctx))
        return loss_sum / tokens


def gathered_weights(chunks) -> dict:
    """Full parameters under global names, gathered from every TP/PP rank.

    TP shards are reassembled the way megatron splits them (chunks of local/stride rows,
    dealt round-robin to ranks), independently of llmforge.models.init.
    """
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    from llmforge.models.init import global_name, unwrap

    tp = parallel_state.get_tensor_model_parallel_world_size()
    out = {}
    for chunk in chunks:
        model = unwrap(chunk)
        for name, param in model.named_parameters():
            tensor = param.detach().clone()
            if tp > 1 and getattr(param, "tensor_model_parallel", False):
                parts = [torch.empty_like(tensor) for _ in range(tp)]
                dist.all_gather(parts, tensor.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
                dim, stride = param.partition_dim, param.partition_stride
                pieces = [part.split(part.shape[dim] // stride, dim=dim) for part in parts]
                tensor = torch.cat([pieces[rank][s] for s in range(stride) for rank in range(tp)], dim=dim)
            out[global_name(model, name)] = tensor
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, out)
    merged = {}
    for part in everyone:
        merged.update(part)
    return merged


def _greedy(trainer: Trainer) -> list[int]:
    """Six greedy ids after PROMPT from the trainer's (untrained) model, through `ModelServer`."""
    from llmforge.runtime.serve import ModelServer

    return ModelServer(trainer.step.chunks).generate([PROMPT], max_new_tokens=6)[0]


def _checkpoint_then_continue(trainer: Trainer, path: Path) -> dict:
    """Train 2 steps, snapshot a save into `path` as a save in the background does (the saved weights,
    gathered, also into `path`.pt), train one more step, and only then write the files, from a thread."""
    from concurrent.futures import ThreadPoolExecutor

    from llmforge.runtime.sharded_io import SnapshotPool, deferred_writes, save_sharded

    import psutil
    import torch
    import torch.distributed as dist

    trainer.train(range(2))
    if trainer.ctx.rank == 0:
        path.mkdir(parents=True)
    dist.barrier()
    children = len(psutil.Process().children(recursive=True))
    with deferred_writes(SnapshotPool()) as deferred:
        save_sharded(path, trainer.chunks, trainer.optimizer, {"step": 2, "note": "saved"})
    weights = gathered_weights(trainer.chunks)
    if trainer.ctx.rank == 0:
        torch.save(weights, path.with_suffix(".pt"))
    saved_eval = trainer.eval()
    after = trainer.train(range(2, 3))  # moves weights and optimizer state before a byte is written
    with ThreadPoolExecutor(1) as writer:
        part = writer.submit(deferred.write).result()
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, part)
    if trainer.ctx.rank == 0:
        deferred.finish(parts)
    dist.barrier()
    new_processes = len(psutil.Process().children(recursive=True)) - children
    return {"eval": saved_eval, "next_loss": after["losses"][0], "new_processes": new_processes}


def _resume(trainer: Trainer, path: Path) -> dict:
    from llmforge.runtime.sharded_io import load_sharded

    before = trainer.eval()
    common = load_sharded(path, trainer.chunks, trainer.optimizer)
    loaded_eval = trainer.eval()
    after = trainer.train(range(2, 3))
    return {"eval_before_load": before, "eval": loaded_eval, "next_loss": after["losses"][0], "common": common}


def _load_other_precision(trainer: Trainer, path: Path) -> dict:
    """Weights only from a checkpoint saved in the other precision (finetuning, export), then 2 steps."""
    import torch

    from llmforge.runtime.sharded_io import load_sharded

    load_sharded(path, trainer.chunks, None)
    saved = torch.load(path.with_suffix(".pt"))
    loaded = gathered_weights(trainer.chunks)
    dtypes = {str(t.dtype) for t in loaded.values()}
    return {"dtypes": sorted(dtypes), "as_saved_cast": all(torch.equal(loaded[k], saved[k].to(loaded[k].dtype)) for k in saved),
            "same_names": sorted(saved) == sorted(loaded), "eval": trainer.eval(), "continued": trainer.train(range(2, 4))}


def _bf16_resume(path: Path) -> dict:
    """One process: train 2 steps, save, 2 more; a fresh run loads and takes the same 2 steps."""
    import hashlib

    import torch

    from llmforge.runtime.sharded_io import load_sharded, save_sharded

    def digest(trainer: Trainer) -> str:
        return hashlib.sha256(b"".join(p.detach().view(-1).view(torch.uint8).numpy().tobytes()
                                       for chunk in trainer.chunks for p in chunk.parameters())).hexdigest()

    first = Trainer("llama", precision="bf16", optimizer="adamw", lr=1e-3)
    first.train(range(2))
    path.mkdir(parents=True)
    save_sharded(path, first.chunks, first.optimizer, {})
    uninterrupted = first.train(range(2, 4))
    second = Trainer("llama", precision="bf16", optimizer="adamw", lr=1e-3, seed=7)
    before = digest(second)
    load_sharded(path, second.chunks, second.optimizer)
    resumed = second.train(range(2, 4))
    masters = [p for group in second.optimizer.optimizer.param_groups for p in group["params"]]
    return {"uninterrupted": uninterrupted["losses"], "resumed": resumed["losses"], "weights": digest(first),
            "resumed_weights": digest(second), "before_load": before,
            "masters_fp32": all(p.dtype == torch.float32 for p in masters), "type": type(second.optimizer).__name__}


def _curves() -> dict:
    """The 2-layer, 128-wide model's train loss over CURVE_STEPS steps, fp32 and bf16."""
    curves = {}
    for precision in ("fp32", "bf16"):
        trainer = Trainer("llama", precision=precision, optimizer="adamw", lr=1e-3, model={"hidden_size": 128})
        curves[precision] = trainer.train(range(CURVE_STEPS))["losses"]
    return curves


def _poison(module, args, output):
    if isinstance(output, tuple):
        return (output[0] * float("nan"), *output[1:])
    return output * float("nan")


def _nonfinite(shape: str, poison_rank: int, **parallelism) -> dict:
    """Poison one rank's activations for one step: every rank must skip it, weights untouched."""
    import torch

    from llmforge.models.init import unwrap

    trainer = Trainer(shape, **parallelism)
    first = unwrap(trainer.chunks[0])
    trainer.train(range(1))
    before = [p.detach().clone() for p in first.parameters()]
    handle = None
    if trainer.ctx.rank == poison_rank:
        handle = first.decoder.layers[0].register_forward_hook(_poison)
    poisoned = trainer.train(range(1, 2))
    if handle is not None:
        handle.remove()
    unchanged = all(torch.equal(a, b) for a, b in zip(before, first.parameters()))
    # megatron's path zeroes DDP's buffers; one process's step (runtime/local_schedule.py) has
    # released them and keeps grads in param.grad, which the veto drops: no grad survives either way.
    grads_zero = (all(bool((b.grad_data == 0).all()) for chunk in trainer.chunks for b in chunk.buffers)
                  and all(p.grad is None or not bool(p.grad.any()) for chunk in trainer.chunks for p in chunk.parameters()))
    recovered = trainer.train(range(2, 3))
    changed_after = not all(torch.equal(a, b) for a, b in zip(before, first.parameters()))
    return {"poisoned": poisoned, "unchanged": unchanged, "grads_zero": grads_zero, "recovered": recovered, "changed_after": changed_after}


def job_pair(out: Path) -> dict:
    import torch

    results = {}
    for shape in SHAPES:
        for layout, parallelism in {
            "tp2": {"tensor_model_parallel_size": 2},
            "pp2": {"pipeline_model_parallel_size": 2},
            "dp2": {},
        }.items():
            trainer = Trainer(shape, **parallelism)
            if trainer.ctx.rank == 0 and layout != "dp2":
                torch.save(trainer.initial, out / f"init_{shape}_{layout}.pt")
            results[f"{shape}_{layout}"] = trainer.train(range(STEPS))
    results["gpt_pp2_vpp2"] = Trainer("gpt", pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2).train(range(STEPS))
    results["llama_tp2_sp_selective"] = Trainer("llama", tensor_model_parallel_size=2, sequence_parallel=True, recompute_granularity="selective").train(range(STEPS))
    results["gpt_tp2_sp_full"] = Trainer("gpt", tensor_model_parallel_size=2, sequence_parallel=True, recompute_granularity="full").train(range(STEPS))
    results["llama_dp2_distopt"] = Trainer("llama", optimizer="adamw", lr=1e-3, use_distributed_optimizer=True).train(range(STEPS))
    results["llama_pp2_autocast"] = Trainer("llama", precision="bf16-autocast", pipeline_model_parallel_size=2).train(range(2))
    results["gpt_tp2_sp_autocast"] = Trainer("gpt", precision="bf16-autocast", tensor_model_parallel_size=2, sequence_parallel=True).train(range(2))
    results["llama_dp2_masked"] = Trainer("llama").train(range(3), masked=True)
    results["gpt_pp2_masked"] = Trainer("gpt", pipeline_model_parallel_size=2).train(range(3), masked=True)
    results["sample_llama_tp2_sp"] = _greedy(Trainer("llama", tensor_model_parallel_size=2, sequence_parallel=True))
    results["sample_llama_pp2"] = _greedy(Trainer("llama", pipeline_model_parallel_size=2))
    results["nonfinite_dp2"] = _nonfinite("llama", poison_rank=1)
    results["nonfinite_pp2"] = _nonfinite("gpt", poison_rank=0, pipeline_model_parallel_size=2)

    results["ckpt_llama_tp2"] = _checkpoint_then_continue(Trainer("llama", optimizer="adamw", lr=1e-3, tensor_model_parallel_size=2), out / "ckpt_llama_tp2")
    results["ckpt_gpt_pp2"] = _checkpoint_then_continue(Trainer("gpt", optimizer="sgd_momentum", lr=0.1, pipeline_model_parallel_size=2), out / "ckpt_gpt_pp2")
    results["ckpt_llama_distopt"] = _checkpoint_then_continue(Trainer("llama", optimizer="adamw", lr=1e-3, use_distributed_optimizer=True), out / "ckpt_llama_distopt")
    results["load_llama_tp2_at_pp2"] = _resume(Trainer("llama", optimizer="adamw", lr=1e-3, seed=7, pipeline_model_parallel_size=2), out / "ckpt_llama_tp2")
    results.update(_bf16_pair(out))
    return results


def _bf16_pair(out: Path) -> dict:
    """Megatron's bf16 at the 2-process layouts (compared with `_bf16_single`'s one process)."""
    results = {}
    bf16 = {"precision": "bf16"}
    adamw = {"precision": "bf16", "optimizer": "adamw", "lr": 1e-3}
    for shape in SHAPES:
        for layout, parallelism in {"tp2": {"tensor_model_parallel_size": 2}, "pp2": {"pipeline_model_parallel_size": 2}, "dp2": {}}.items():
            results[f"bf16_{shape}_{layout}"] = Trainer(shape, **bf16, **parallelism).train(range(STEPS))
    results["bf16_gpt_pp2_vpp2"] = Trainer("gpt", **bf16, pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2).train(range(STEPS))
    results["bf16_llama_tp2_sp_selective"] = Trainer("llama", **bf16, tensor_model_parallel_size=2, sequence_parallel=True,
                                                     recompute_granularity="selective").train(range(STEPS))
    results["bf16_gpt_tp2_sp_full"] = Trainer("gpt", **bf16, tensor_model_parallel_size=2, sequence_parallel=True,
                                              recompute_granularity="full").train(range(STEPS))
    results["bf16_llama_dp2_distopt"] = Trainer("llama", **adamw, use_distributed_optimizer=True).train(range(STEPS))
    results["bf16_sample_llama_pp2"] = _greedy(Trainer("llama", **bf16, pipeline_model_parallel_size=2))
    results["ckpt_bf16_llama_tp2"] = _checkpoint_then_continue(Trainer("llama", **adamw, tensor_model_parallel_size=2), out / "ckpt_bf16_llama_tp2")
    results["ckpt_bf16_llama_distopt"] = _checkpoint_then_continue(Trainer("llama", **adamw, use_distributed_optimizer=True),
                                                                   out / "ckpt_bf16_llama_distopt")
    results["load_bf16_llama_tp2_at_pp2"] = _resume(Trainer("llama", **adamw, seed=7, pipeline_model_parallel_size=2), out / "ckpt_bf16_llama_tp2")
    return results


def job_single(out: Path) -> dict:
    import torch

    results = {}
    for shape in SHAPES:
        trainer = Trainer(shape)
        torch.save(trainer.initial, out / f"init_{shape}_single.pt")
        results[f"{shape}_single"] = trainer.train(range(STEPS))
        results[f"{shape}_single_autocast"] = Trainer(shape, precision="bf16-autocast").train(range(2))
    results["llama_single_adamw"] = Trainer("llama", optimizer="adamw", lr=1e-3).train(range(STEPS))
    results["llama_single_masked"] = Trainer("llama").train(range(3), masked=True)
    results["gpt_single_masked"] = Trainer("gpt").train(range(3), masked=True)
    results["masked_token_counts"] = [int(sum(m.sum() for m in _loss_masks(s))) for s in range(3)]
    results["sample_llama_single"] = _greedy(Trainer("llama"))
    for recompute in ("none", "selective", "full"):
        dropout = {"hidden_dropout": 0.1, "attention_dropout": 0.1}
        results[f"llama_dropout_recompute_{recompute}"] = Trainer("llama", model=dropout, recompute_granularity=recompute).train(range(3))
    results["nonfinite_single"] = _nonfinite("llama", poison_rank=0)
    results["load_llama_tp2_at_tp1"] = _resume(Trainer("llama", optimizer="adamw", lr=1e-3, seed=7), out / "ckpt_llama_tp2")
    results["load_gpt_pp2_at_tp1"] = _resume(Trainer("gpt", optimizer="sgd_momentum", lr=0.1, seed=7), out / "ckpt_gpt_pp2")
    results["load_llama_distopt_at_tp1"] = _resume(Trainer("llama", optimizer="adamw", lr=1e-3, seed=7, use_distributed_optimizer=True), out / "ckpt_llama_distopt")
    results.update(_bf16_single(out))
    return results


def _bf16_single(out: Path) -> dict:
    """Megatron's bf16 in one process: the references, the curves, resume and the 2-process checkpoints."""
    results = {}
    adamw = {"precision": "bf16", "optimizer": "adamw", "lr": 1e-3}
    for shape in SHAPES:
        results[f"bf16_{shape}_single"] = Trainer(shape, precision="bf16").train(range(STEPS))
    results["bf16_llama_single_adamw"] = Trainer("llama", **adamw).train(range(STEPS))
    results["bf16_sample_llama_single"] = _greedy(Trainer("llama", precision="bf16"))
    results["bf16_curves"] = _curves()
    results["bf16_resume"] = _bf16_resume(out / "bf16_resume")
    results["load_bf16_llama_tp2_at_tp1"] = _resume(Trainer("llama", **adamw, seed=7), out / "ckpt_bf16_llama_tp2")
    results["load_bf16_llama_distopt_at_tp1"] = _resume(Trainer("llama", **adamw, seed=7, use_distributed_optimizer=True),
                                                        out / "ckpt_bf16_llama_distopt")
    results["load_bf16_llama_tp2_into_fp32"] = _load_other_precision(Trainer("llama", optimizer="adamw", lr=1e-3, seed=7), out / "ckpt_bf16_llama_tp2")
    results["load_fp32_llama_tp2_into_bf16"] = _load_other_precision(Trainer("llama", **adamw, seed=7), out / "ckpt_llama_tp2")
    results["resume_fp32_as_bf16"] = _refused_resume(Trainer("llama", **adamw, seed=7), out / "ckpt_llama_tp2")
    return results


def _refused_resume(trainer: Trainer, path: Path) -> str:
    """What resuming an optimizer from a checkpoint of the other precision says."""
    from llmforge.runtime.sharded_io import load_sharded
    from llmforge.spec.errors import UserError

    try:
        load_sharded(path, trainer.chunks, trainer.optimizer)
    except UserError as refusal:
        return f"{refusal} | {refusal.hint}"
    return "loaded"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--job", choices=["pair", "single"], required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    results = {"pair": job_pair, "single": job_single}[args.job](args.out)
    rank = int(os.environ.get("RANK", 0))
    (args.out / f"{args.job}_rank{rank}.json").write_text(json.dumps(results, indent=1))

    from llmforge.runtime.distributed import shutdown

    shutdown()


# --- the tests -------------------------------------------------------------------------------


def _launch(job: str, nproc: int, out: Path) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", __file__, "--job", job, "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if done.returncode != 0:
        raise AssertionError(f"{job} job failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("layouts")
    _launch("pair", 2, out)
    _launch("single", 1, out)
    results = {}
    for name in ("pair_rank0", "pair_rank1", "single_rank0"):
        results[name] = json.loads((out / f"{name}.json").read_text())
    results["dir"] = out
    return results


def _close(a: list[float], b: list[float], tolerance: float = TOLERANCE) -> float:
    assert len(a) == len(b)
    worst = max(abs(x - y) for x, y in zip(a, b))
    assert worst <= tolerance, f"{a} vs {b}: max |diff| {worst:.2e} > {tolerance:.0e}"
    return worst


pytestmark = pytest.mark.slow


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", ["tp2", "pp2", "dp2"])
def test_layout_trains_like_one_process(runs, shape, layout):
    reference = runs["single_rank0"][f"{shape}_single"]
    for rank in ("pair_rank0", "pair_rank1"):
        got = runs[rank][f"{shape}_{layout}"]
        _close(got["losses"], reference["losses"])
        _close(got["grad_norms"], reference["grad_norms"], 1e-5)
        assert got["tokens"] == reference["tokens"] == [MICRO_BATCHES * MICRO_BATCH * SEQ] * STEPS
    # The curve is compared over real learning, with clipping active.
    assert reference["losses"][-1] < reference["losses"][0] - 0.02
    assert min(reference["grad_norms"]) > CLIP_GRAD


@pytest.mark.parametrize(
    "case, shape",
    [("gpt_pp2_vpp2", "gpt"), ("llama_tp2_sp_selective", "llama"), ("gpt_tp2_sp_full", "gpt")],
)
def test_virtual_pipeline_sequence_parallel_and_recompute_match(runs, case, shape):
    _close(runs["pair_rank0"][case]["losses"], runs["single_rank0"][f"{shape}_single"]["losses"])


def test_distributed_optimizer_matches_adamw(runs):
    _close(runs["pair_rank0"]["llama_dp2_distopt"]["losses"], runs["single_rank0"]["llama_single_adamw"]["losses"])


@pytest.mark.parametrize("case, reference", [("llama_dp2_masked", "llama_single_masked"), ("gpt_pp2_masked", "gpt_single_masked")])
def test_loss_masks_weigh_per_token_across_ranks(runs, case, reference):
    single = runs["single_rank0"]
    got = runs["pair_rank0"][case]
    _close(got["losses"], single[reference]["losses"])
    assert got["tokens"] == single[reference]["tokens"] == single["masked_token_counts"]
    assert got["losses"] != single[reference.removesuffix("_masked")]["losses"][:3]


def test_greedy_generation_agrees_across_layouts(runs):
    single = runs["single_rank0"]["sample_llama_single"]
    assert len(single) == 6 and all(0 <= t < VOCAB for t in single)
    assert runs["pair_rank0"]["sample_llama_tp2_sp"] == runs["pair_rank1"]["sample_llama_tp2_sp"] == single
    assert runs["pair_rank0"]["sample_llama_pp2"] == runs["pair_rank1"]["sample_llama_pp2"] == single


@pytest.mark.parametrize("shape, layout", [("gpt", "tp2"), ("gpt", "pp2"), ("llama", "tp2"), ("llama", "pp2")])
def test_initialization_is_layout_invariant(runs, shape, layout):
    import torch

    reference = torch.load(runs["dir"] / f"init_{shape}_single.pt")
    gathered = torch.load(runs["dir"] / f"init_{shape}_{layout}.pt")
    assert sorted(gathered) == sorted(reference)
    for name in reference:
        assert torch.equal(gathered[name], reference[name]), name


def test_bf16_autocast_steps_run_close_to_fp32(runs):
    single = runs["single_rank0"]
    for case, shape in (("llama_pp2_autocast", "llama"), ("gpt_tp2_sp_autocast", "gpt")):
        got = runs["pair_rank0"][case]
        assert not any(got["nonfinite"])
        _close(got["losses"], single[f"{shape}_single"]["losses"][:2], 5e-2)
        _close(got["losses"], single[f"{shape}_single_autocast"]["losses"], 5e-2)
    assert single["llama_single_autocast"]["losses"] != single["llama_single"]["losses"][:2]  # autocast really ran


# --- megatron's bf16 ---------------------------------------------------------------------------


def test_bf16_curve_follows_fp32_over_200_steps(runs):
    curves = runs["single_rank0"]["bf16_curves"]
    fp32, bf16 = curves["fp32"], curves["bf16"]
    assert len(fp32) == len(bf16) == CURVE_STEPS
    assert fp32[0] - fp32[-1] > 5.0  # a real descent, not a flat line the curves could share
    assert bf16 != fp32  # bf16 really ran
    _close(bf16, fp32, CURVE_STEP_TOLERANCE)
    tail = lambda curve: sum(curve[-20:]) / 20  # noqa: E731
    assert abs(tail(bf16) - tail(fp32)) <= CURVE_TAIL_RELATIVE * tail(fp32)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", ["tp2", "pp2", "dp2"])
def test_bf16_layout_trains_like_one_bf16_process(runs, shape, layout):
    reference = runs["single_rank0"][f"bf16_{shape}_single"]
    for rank in ("pair_rank0", "pair_rank1"):
        got = runs[rank][f"bf16_{shape}_{layout}"]
        assert not any(got["nonfinite"])
        _close(got["losses"], reference["losses"], BF16_TOLERANCE)
        assert got["tokens"] == reference["tokens"]
    if (shape, layout) == ("llama", "pp2"):  # untied: the same roundings in the same order
        assert runs["pair_rank0"]["bf16_llama_pp2"]["losses"] == reference["losses"]
    assert reference["losses"][-1] < reference["losses"][0] - 0.02
    assert reference["losses"] != runs["single_rank0"][f"{shape}_single"]["losses"]  # bf16, not fp32


@pytest.mark.parametrize(
    "case, reference",
    [("bf16_gpt_pp2_vpp2", "bf16_gpt_single"), ("bf16_llama_tp2_sp_selective", "bf16_llama_single"),
     ("bf16_gpt_tp2_sp_full", "bf16_gpt_single"), ("bf16_llama_dp2_distopt", "bf16_llama_single_adamw")],
)
def test_bf16_virtual_pipeline_sequence_parallel_recompute_and_distributed_optimizer_match(runs, case, reference):
    _close(runs["pair_rank0"][case]["losses"], runs["single_rank0"][reference]["losses"], BF16_TOLERANCE)


def test_bf16_greedy_generation_agrees_across_layouts(runs):
    single = runs["single_rank0"]["bf16_sample_llama_single"]
    assert runs["pair_rank0"]["bf16_sample_llama_pp2"] == runs["pair_rank1"]["bf16_sample_llama_pp2"] == single


def test_bf16_resumes_bitwise_on_one_process(runs):
    got = runs["single_rank0"]["bf16_resume"]
    assert got["type"] == "Float16OptimizerWithFloat16Params" and got["masters_fp32"]
    assert got["before_load"] != got["weights"]
    assert got["resumed"] == got["uninterrupted"]
    assert got["resumed_weights"] == got["weights"]  # fp32 master weights and Adam state came back exactly


@pytest.mark.parametrize(
    "saved, loaded, rank",
    [
        ("ckpt_bf16_llama_tp2", "load_bf16_llama_tp2_at_pp2", "pair_rank0"),
        ("ckpt_bf16_llama_tp2", "load_bf16_llama_tp2_at_pp2", "pair_rank1"),
        ("ckpt_bf16_llama_tp2", "load_bf16_llama_tp2_at_tp1", "single_rank0"),
        ("ckpt_bf16_llama_distopt", "load_bf16_llama_distopt_at_tp1", "single_rank0"),
    ],
)
def test_bf16_checkpoint_reshards_and_continues(runs, saved, loaded, rank):
    before = runs["pair_rank0"][saved]
    after = runs[rank][loaded]
    assert abs(after["eval_before_load"] - before["eval"]) > 1e-3
    _close([after["eval"]], [before["eval"]], BF16_TOLERANCE)
    _close([after["next_loss"]], [before["next_loss"]], BF16_TOLERANCE)
    if saved.endswith("distopt"):  # DP=2 to DP=1, no TP: the same roundings
        assert after["eval"] == before["eval"] and after["next_loss"] == before["next_loss"]
    assert after["common"] == {"step": 2, "note": "saved"}


def test_an_optimizer_does_not_resume_across_precisions(runs):
    said = runs["single_rank0"]["resume_fp32_as_bf16"]
    assert "holds float32 weights, but this stage trains bfloat16 ones" in said and "init_from" in said


@pytest.mark.parametrize(
    "case, dtype, saved",
    [("load_bf16_llama_tp2_into_fp32", "torch.float32", "ckpt_bf16_llama_tp2"),
     ("load_fp32_llama_tp2_into_bf16", "torch.bfloat16", "ckpt_llama_tp2")],
)
def test_a_checkpoint_loads_into_the_other_precision(runs, case, dtype, saved):
    got = runs["single_rank0"][case]
    assert got["dtypes"] == [dtype] and got["same_names"]
    assert got["as_saved_cast"]  # bf16 -> fp32 exactly; fp32 -> bf16 rounded, as the fp32 run's init is
    # The loaded model scores as the saved one did (up to bf16 against fp32) and trains on.
    _close([got["eval"]], [runs["pair_rank0"][saved]["eval"]], 1e-2)
    assert not any(got["continued"]["nonfinite"]) and got["continued"]["losses"][-1] < got["eval"] + 0.05


def test_recompute_replays_dropout_exactly(runs):
    single = runs["single_rank0"]
    plain = single["llama_dropout_recompute_none"]["losses"]
    assert plain != single["llama_single"]["losses"][:3]  # dropout is on
    assert single["llama_dropout_recompute_selective"]["losses"] == plain
    assert single["llama_dropout_recompute_full"]["losses"] == plain


@pytest.mark.parametrize("case", ["nonfinite_single", "nonfinite_dp2", "nonfinite_pp2"])
def test_nonfinite_step_is_skipped_on_every_rank(runs, case):
    ranks = ["single_rank0"] if case == "nonfinite_single" else ["pair_rank0", "pair_rank1"]
    for rank in ranks:
        got = runs[rank][case]
        assert got["poisoned"]["nonfinite"] == [True]
        assert got["unchanged"], "a skipped step changed the weights"
        assert got["grads_zero"], "a skipped step left gradients behind"
        assert got["recovered"]["nonfinite"] == [False] and math.isfinite(got["recovered"]["losses"][0])
        assert got["changed_after"]


@pytest.mark.parametrize(
    "saved, loaded, rank",
    [
        ("ckpt_llama_tp2", "load_llama_tp2_at_pp2", "pair_rank0"),
        ("ckpt_llama_tp2", "load_llama_tp2_at_pp2", "pair_rank1"),
        ("ckpt_llama_tp2", "load_llama_tp2_at_tp1", "single_rank0"),
        ("ckpt_gpt_pp2", "load_gpt_pp2_at_tp1", "single_rank0"),
        ("ckpt_llama_distopt", "load_llama_distopt_at_tp1", "single_rank0"),
    ],
)
def test_checkpoint_reshards_and_resumes(runs, saved, loaded, rank):
    before = runs["pair_rank0"][saved]
    after = runs[rank][loaded]
    assert abs(after["eval_before_load"] - before["eval"]) > 1e-4  # the load is what makes them equal
    _close([after["eval"]], [before["eval"]])
    # The optimizer state came along: the next step matches the uninterrupted run.
    _close([after["next_loss"]], [before["next_loss"]])
    assert after["common"] == {"step": 2, "note": "saved"}
    assert before["new_processes"] == 0  # the writer is a thread: no spawn Manager, no forks


if __name__ == "__main__":
    main()
