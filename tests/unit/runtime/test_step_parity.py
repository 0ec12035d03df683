"""Every parallel layout trains like one process: the same weights, losses and checkpoints.

As Megatron's own tests do: CPU, gloo, fp32, SGD (or AdamW at a small lr), fixed batches.
Two jobs run under the real launcher (torchrun) and do all the work; this file is also
their worker (`python -m torch.distributed.run ... test_step_parity.py --job pair`):

- `pair` (2 processes): TP=2, PP=2, PP=2 with virtual stages, DP=2, TP=2 with sequence
  parallel and recompute, the DistributedOptimizer, bf16, a non-finite step, and saving
  checkpoints at TP=2, PP=2 and DP=2 (loading the TP=2 one at PP=2).
- `single` (1 process): the reference runs, recompute with dropout, and loading the
  2-process checkpoints at TP=1.

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
    from llmforge.runtime.sharded_io import save_sharded

    import psutil
    import torch.distributed as dist

    trainer.train(range(2))
    if trainer.ctx.rank == 0:
        path.mkdir(parents=True)
    dist.barrier()
    children = len(psutil.Process().children(recursive=True))
    save_sharded(path, trainer.chunks, trainer.optimizer, {"step": 2, "note": "saved"})
    new_processes = len(psutil.Process().children(recursive=True)) - children
    saved_eval = trainer.eval()
    after = trainer.train(range(2, 3))
    return {"eval": saved_eval, "next_loss": after["losses"][0], "new_processes": new_processes}


def _resume(trainer: Trainer, path: Path) -> dict:
    from llmforge.runtime.sharded_io import load_sharded

    before = trainer.eval()
    common = load_sharded(path, trainer.chunks, trainer.optimizer)
    loaded_eval = trainer.eval()
    after = trainer.train(range(2, 3))
    return {"eval_before_load": before, "eval": loaded_eval, "next_loss": after["losses"][0], "common": common}


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
    grads_zero = all(not chunk.buffers or all(bool((b.grad_data == 0).all()) for b in chunk.buffers) for chunk in trainer.chunks)
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
    results["llama_pp2_bf16"] = Trainer("llama", precision="bf16", pipeline_model_parallel_size=2).train(range(2))
    results["gpt_tp2_sp_bf16"] = Trainer("gpt", precision="bf16", tensor_model_parallel_size=2, sequence_parallel=True).train(range(2))
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
    return results


def job_single(out: Path) -> dict:
    import torch

    results = {}
    for shape in SHAPES:
        trainer = Trainer(shape)
        torch.save(trainer.initial, out / f"init_{shape}_single.pt")
        results[f"{shape}_single"] = trainer.train(range(STEPS))
        results[f"{shape}_single_bf16"] = Trainer(shape, precision="bf16").train(range(2))
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
    return results


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


def test_bf16_steps_run_close_to_fp32(runs):
    single = runs["single_rank0"]
    for case, shape in (("llama_pp2_bf16", "llama"), ("gpt_tp2_sp_bf16", "gpt")):
        got = runs["pair_rank0"][case]
        assert not any(got["nonfinite"])
        _close(got["losses"], single[f"{shape}_single"]["losses"][:2], 5e-2)
        _close(got["losses"], single[f"{shape}_single_bf16"]["losses"], 5e-2)
    assert single["llama_single_bf16"]["losses"] != single["llama_single"]["losses"][:2]  # autocast really ran


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
    assert before["new_processes"] == 0  # the synchronous writer: no spawn Manager, no forks


if __name__ == "__main__":
    main()
