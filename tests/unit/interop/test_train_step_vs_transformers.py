"""llmforge's training step against transformers: the same weights, batches and update rule, written twice.

HF transformers is the reference. A Llama-shaped and a GPT-2-shaped model (fp32, TP=1, one
process) start from the same weights — llmforge's, exported by `export_hf` and loaded with
`from_pretrained` — see the same batches and train `STEPS` steps with torch AdamW. The
llmforge side is the pretrain stage's own wiring (`build_training`): the registry's model,
`param_groups`, the registry's optimizer and schedule, `wrap_optimizer` and `TrainStep`, two
micro batches per step. The HF side is written here, from the rules and not from llmforge's
code: one forward over the whole batch with a mean token loss, decay groups chosen by module
type (no decay on norms and biases; embeddings by option), `clip_grad_norm_`, warmup then
cosine, and the same torch AdamW implementation flag (`fused=True`).

The shapes cover tied embeddings (GPT-2: the tied weight decays once), decay_embeddings off
(Llama: its embedding does not decay, its untied output layer does), megatron's fused QKV
(GQA) and SwiGLU layouts, and biases. Clipping acts on some steps and not others.

Measured on CPU (torch 2.13, transformers 5.24, megatron-core 0.16.1), max |difference| over
the 20 steps and over every element of every final weight, at 1 and 2 threads:

    llama: loss 9.5e-7 / 9.5e-7, weights 1.26e-5 / 1.26e-5 (mlp.up_proj, layer 0)
    gpt2:  loss 9.5e-7 / 1.2e-6, weights 8.8e-6 / 1.13e-5 (attn.c_attn.bias: the key bias)

Loss is held to the issue's 1e-5. Weights are held to 5e-5 (4x the largest measured), not
1e-5, for a numerical reason: AdamW's update is m/(sqrt(v) + eps), which for an element
whose gradient is about eps (1e-8) or smaller turns fp32 rounding of that gradient into a
change of a few percent of lr. Llama's worst element has a step-0 gradient of 1.5e-9 that
the two sides round to 1.57e-9 and 1.32e-9: updates of 0.136 and 0.117 × lr, 1.15e-5 apart
after that one step, and it stays there. GPT-2's worst are key biases, whose gradient is
zero in exact arithmetic (softmax ignores a shift shared by every key) and rounding noise
of ~1e-12 in practice. transformers against itself, with only the batch's summation order
changed (two accumulated halves), differs by 1.4e-6 (llama) and 8.4e-6 (gpt2) in weights.

The megatron work runs in a child process
(`python test_train_step_vs_transformers.py --out facts.json --arch llama --tmp DIR`).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest

from tests.child import worker_facts

pytestmark = pytest.mark.slow

SEED = 1234
STEPS = 20
MICRO_BATCH, MICRO_BATCHES = 2, 2
LR, MIN_LR, WARMUP = 3.0e-3, 3.0e-4, 5
BETAS, EPS, WEIGHT_DECAY = (0.9, 0.95), 1.0e-8, 0.1
BYTES = 256
FUSED = True  # the torch AdamW implementation both sides must use
LOSS_TOLERANCE = 1e-5
WEIGHT_TOLERANCE = 5e-5  # see the module docstring

# decay_embeddings per shape: off for Llama (its untied output layer still decays), on for
# GPT-2 (the tied embedding decays, once). The clip value sits inside each shape's range of
# grad norms over the run, so some steps clip and some do not.
DECAY_EMBEDDINGS = {"llama": False, "gpt2": True}
CLIP_GRAD = {"llama": 2.0, "gpt2": 0.7}


# --- the reference, written from the rules -------------------------------------------------


def reference_lr(step: int) -> float:
    """Warmup then cosine to MIN_LR at STEPS; `step` counts from 0 and warmup's first step already trains."""
    if step < WARMUP:
        return LR * (step + 1) / WARMUP
    progress = (step - WARMUP) / (STEPS - WARMUP)
    return MIN_LR + (LR - MIN_LR) * 0.5 * (1 + math.cos(math.pi * progress))


def reference_groups(model, decay_embeddings: bool) -> list[dict]:
    """Decay and no-decay groups by module type: norms and biases never decay; embeddings by option.

    A weight tied to an embedding (GPT-2's lm_head) is one parameter, in one group.
    """
    import torch

    no_decay: set[int] = set()
    for module in model.modules():
        is_norm = isinstance(module, torch.nn.LayerNorm) or type(module).__name__.endswith("RMSNorm")
        is_embedding = isinstance(module, torch.nn.Embedding)
        for name, param in module.named_parameters(recurse=False):
            if is_norm or name == "bias" or (is_embedding and not decay_embeddings):
                no_decay.add(id(param))
    params = list(model.parameters())  # tied weights once
    return [{"params": [p for p in params if id(p) not in no_decay], "weight_decay": WEIGHT_DECAY},
            {"params": [p for p in params if id(p) in no_decay], "weight_decay": 0.0}]


def batch(step: int):
    """[MICRO_BATCHES * MICRO_BATCH, SEQ + 1] arithmetic runs over the byte ids (random start and stride): learnable.

    Byte ids only, as text gives: the ids above them are the tokenizer's specials, and the
    exported config names one of them `pad_token_id`, whose embedding row transformers'
    Llama (`padding_idx`) never trains, while megatron trains every row it sees.
    """
    import torch

    from tests.unit.interop.tiny import SEQ

    generator = torch.Generator().manual_seed(100 + step)
    count = MICRO_BATCHES * MICRO_BATCH
    start = torch.randint(0, BYTES, (count, 1), generator=generator)
    stride = torch.randint(1, 4, (count, 1), generator=generator)
    return (start + stride * torch.arange(SEQ + 1)) % BYTES


def train_transformers(hf_dir: Path, *, decay_embeddings: bool, clip_grad: float) -> dict:
    """The reference run: transformers' model, torch AdamW, the rules above."""
    import torch
    import torch.nn.functional as F
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    model.train()  # dropout is 0 in the exported config
    groups = reference_groups(model, decay_embeddings)
    optimizer = torch.optim.AdamW(groups, lr=LR, betas=BETAS, eps=EPS, fused=FUSED)
    losses, grad_norms = [], []
    for step in range(STEPS):
        tokens = batch(step)
        logits = model(input_ids=tokens[:, :-1]).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        grad_norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)))
        for group in optimizer.param_groups:
            group["lr"] = reference_lr(step)
        optimizer.step()
        losses.append(loss.item())
    return {"model": model, "losses": losses, "grad_norms": grad_norms,
            "decay_numel": sum(p.numel() for p in groups[0]["params"]), "no_decay_numel": sum(p.numel() for p in groups[1]["params"])}


# --- llmforge's side, in the child ----------------------------------------------------------


def _facts(arch: str, tmp: Path) -> dict:
    from llmforge.interop.export import export_hf
    from llmforge.interop.hf_files import read_hf_weights
    from llmforge.interop.hf_mapping import to_hf
    from llmforge.interop.model_io import state_of
    from llmforge.models.init import unwrap
    from llmforge.registry.manager import get_registry
    from llmforge.runtime.distributed import init_distributed
    from llmforge.runtime.optim import param_groups, wrap_optimizer
    from llmforge.runtime.step import TrainStep
    from llmforge.spec.components import GPTModel
    from llmforge.spec.schema import ParallelismConfig
    from tests.unit.interop.tiny import MODELS, SEQ, perturb, write_run

    registry = get_registry()
    options = GPTModel.model_validate(MODELS[arch])
    parallelism = ParallelismConfig()
    ctx = init_distributed(parallelism, seed=SEED)
    chunks = registry.factory("model", "gpt")(options, parallelism, precision="fp32", seed=SEED)
    perturb(chunks[0])  # norms and biases away from one and zero, so decay on them shows
    write_run(tmp / "run", MODELS[arch], chunks[0])
    export_hf(tmp / "run", tmp / "hf")

    # Wired as build_training does, from options as a spec's `optimizer:` and `lr_schedule:` validate to.
    opt_options = registry.get("optimizer", "adamw").typed_options.model_validate(
        {"name": "adamw", "lr": LR, "betas": BETAS, "eps": EPS, "weight_decay": WEIGHT_DECAY, "decay_embeddings": DECAY_EMBEDDINGS[arch]})
    schedule_options = registry.get("lr_schedule", "cosine").typed_options.model_validate(
        {"name": "cosine", "warmup_steps": WARMUP, "min_lr": MIN_LR})
    groups = param_groups(chunks, weight_decay=opt_options.weight_decay, decay_embeddings=opt_options.decay_embeddings)
    torch_optimizer = registry.build("optimizer", opt_options, params=groups)
    optimizer = wrap_optimizer(torch_optimizer, chunks, parallelism)
    schedule = registry.build("lr_schedule", schedule_options, peak_lr=LR, total_steps=STEPS)
    step_fn = TrainStep(chunks, optimizer, parallelism_ctx=ctx, seq_length=SEQ, micro_batch_size=MICRO_BATCH, precision="fp32",
                        clip_grad=CLIP_GRAD[arch])
    losses, grad_norms, lrs = [], [], []
    for step in range(STEPS):
        lrs.append(schedule(step))
        result = step_fn(list(batch(step).split(MICRO_BATCH)), lrs[-1])
        assert result.applied
        losses.append(result.loss)
        grad_norms.append(result.grad_norm)
    ours = to_hf(state_of(unwrap(chunks[0])), options, source="the trained model")

    reference = train_transformers(tmp / "hf", decay_embeddings=DECAY_EMBEDDINGS[arch], clip_grad=CLIP_GRAD[arch])
    theirs = dict(reference["model"].named_parameters())
    weight_diffs = {name: float((ours[name] - theirs[name].detach()).abs().max()) if name in theirs else None for name in ours}
    return {
        "llmforge": {"losses": losses, "grad_norms": grad_norms, "lrs": lrs, "fused": bool(torch_optimizer.defaults.get("fused")),
                     "decay_numel": sum(p.numel() for p in groups[0]["params"]),
                     "no_decay_numel": sum(p.numel() for p in groups[1]["params"])},
        "transformers": {k: v for k, v in reference.items() if k != "model"} | {"names": sorted(theirs)},
        "reference_lrs": [reference_lr(s) for s in range(STEPS)],
        "clip_grad": CLIP_GRAD[arch],
        "weight_diffs": weight_diffs,
        "weights_moved": float(max((ours[name] - start).abs().max() for name, start in read_hf_weights(tmp / "hf").items())),
    }


# --- the tests ------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def facts(request, tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp(f"vs_transformers_{request.param}")
    return worker_facts(__file__, tmp / "facts.json", "--arch", request.param, "--tmp", str(tmp))


def test_both_sides_train_under_the_same_rules(facts):
    ours, theirs = facts["llmforge"], facts["transformers"]
    assert ours["fused"] is FUSED, "llmforge's AdamW implementation changed: make the reference use the same"
    assert ours["lrs"] == pytest.approx(facts["reference_lrs"], rel=1e-12, abs=0)
    # The same parameters decay: counted by elements, since the two sides name and fuse tensors differently.
    assert (ours["decay_numel"], ours["no_decay_numel"]) == (theirs["decay_numel"], theirs["no_decay_numel"])
    # Clipping is part of the comparison: some steps clip, some do not.
    assert min(theirs["grad_norms"]) < facts["clip_grad"] < max(theirs["grad_norms"])
    assert ours["grad_norms"] == pytest.approx(theirs["grad_norms"], rel=1e-4)


def test_per_step_loss_matches_transformers(facts):
    ours, theirs = facts["llmforge"]["losses"], facts["transformers"]["losses"]
    assert len(ours) == len(theirs) == STEPS
    assert ours[-1] < ours[0] - 0.2  # it learns, so later steps depend on earlier updates
    worst = max(abs(a - b) for a, b in zip(ours, theirs))
    assert worst <= LOSS_TOLERANCE, f"max |loss difference| {worst:.3g} over {STEPS} steps:\n{list(zip(ours, theirs))}"


def test_final_weights_match_transformers(facts):
    diffs = facts["weight_diffs"]
    missing = sorted(n for n, d in diffs.items() if d is None)
    assert not missing, f"tensors transformers does not have: {missing}"
    assert sorted(diffs) == facts["transformers"]["names"]
    assert facts["weights_moved"] > 100 * WEIGHT_TOLERANCE  # the comparison is not of untrained weights
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] <= WEIGHT_TOLERANCE, f"max |weight difference| {diffs[worst]:.3g} in {worst}"


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--arch", choices=sorted(DECAY_EMBEDDINGS), required=True)
    parser.add_argument("--tmp", type=Path, required=True)
    args = parser.parse_args()
    args.out.write_text(json.dumps(_facts(args.arch, args.tmp)))
