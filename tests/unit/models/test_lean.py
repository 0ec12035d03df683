"""Lean layers (models.lean): megatron's dense block computed batch-first gives megatron's numbers.

Each case builds one model and runs the same batch through the lean forward and through
megatron's own (`decoder.lean = False`): the losses and every parameter's gradient must agree
to float rounding in fp32, and under bf16 both must be as far from fp32 as each other. Where
megatron's path is needed (a LoRA hook, dropout while training) the lean one must stand aside.
The HF parity tests (tests/unit/interop) check the lean path against transformers as well.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("megatron.core")

from llmforge.models.presets import shrink  # noqa: E402
from llmforge.spec.components import GPTModel  # noqa: E402
from llmforge.spec.schema import ParallelismConfig  # noqa: E402

NANOGPT = dict(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=128, seq_length=16,
               position_embedding_type="learned_absolute", normalization="LayerNorm", activation="gelu", add_bias_linear=False)
CASES = {
    "nanogpt": NANOGPT,
    # biases everywhere (bias-add outside the row-parallel linears), tanh GELU, tied output
    "gpt2": shrink("gpt2-124m", num_layers=2, hidden_dropout=0.0, attention_dropout=0.0),
    # RoPE, GQA (2 query groups), SwiGLU, RMSNorm in fp32, untied output
    "llama-gqa": shrink("llama2-7b", num_layers=2, num_query_groups=2),
    # per-head query/key norms, a bias on the QKV projection only, scaled RoPE
    "qwen-like": shrink("llama2-7b", num_layers=2, num_query_groups=2, qk_layernorm=True, add_qkv_bias=True, rope_scaling_factor=8.0),
}


@pytest.fixture
def lean_calls(monkeypatch):
    from llmforge.models import lean

    calls = []
    original = lean._layers  # both lean paths, the whole model's and the block's alone, run their layers here
    monkeypatch.setattr(lean, "_layers", lambda *args: calls.append(1) or original(*args))
    return calls


def _model(options: dict, precision: str = "fp32"):
    from llmforge.models.gpt import build_gpt
    from llmforge.runtime.distributed import init_distributed

    init_distributed(ParallelismConfig(), seed=5)
    (model,) = build_gpt(GPTModel(**options), ParallelismConfig(), precision=precision, seed=5)
    return model


def _batch(options: dict, b: int = 3):
    s = options["seq_length"]
    ids = torch.randint(0, options["vocab_size"], (b, s + 1), generator=torch.Generator().manual_seed(1))
    return ids[:, :-1], torch.arange(s).expand(b, -1), ids[:, 1:]


def _run(model, batch, *, lean: bool, autocast: bool = False, **kwargs):
    """(per-token losses, {name: grad}) of one forward and backward."""
    from llmforge.models.init import unwrap

    unwrap(model).decoder.lean = lean
    model.zero_grad(set_to_none=True)
    tokens, positions, labels = batch
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(tokens, positions, kwargs.pop("attention_mask", None), labels=labels, **kwargs)
    loss.float().mean().backward()
    return loss.detach().float(), {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}


def _grad_error(got: dict, want: dict) -> float:
    assert got.keys() == want.keys()
    return max(((got[n] - want[n]).norm() / want[n].norm().clamp_min(1e-30)).item() for n in want)


@pytest.mark.parametrize("case", CASES)
def test_lean_block_gives_megatrons_losses_and_grads(case, lean_calls):
    options = CASES[case]
    model, batch = _model(options), _batch(options)
    lean_loss, lean_grads = _run(model, batch, lean=True)
    assert lean_calls, "the lean path was not taken"
    calls = len(lean_calls)
    mega_loss, mega_grads = _run(model, batch, lean=False)
    assert len(lean_calls) == calls
    torch.testing.assert_close(lean_loss, mega_loss, rtol=1e-6, atol=1e-6)
    assert _grad_error(lean_grads, mega_grads) < 1e-5
    # without labels: the logits [b, s, vocab], as megatron returns them
    tokens, positions, _ = batch
    with torch.no_grad():
        model.decoder.lean = True
        lean_logits = model(tokens, positions, None)
        model.decoder.lean = False
        mega_logits = model(tokens, positions, None)
    assert lean_logits.shape == mega_logits.shape == (*tokens.shape, options["vocab_size"])
    torch.testing.assert_close(lean_logits, mega_logits, rtol=1e-5, atol=1e-5)


def test_the_blocks_own_lean_forward_gives_megatrons(lean_calls):
    """The block alone (its [s, b, h] interface, for callers that embed themselves): as megatron's block."""
    options = CASES["llama-gqa"]
    model, (tokens, positions, _) = _model(options), _batch(options)
    hidden = torch.randn(options["seq_length"], 3, options["hidden_size"], generator=torch.Generator().manual_seed(2))
    freqs = model.rotary_pos_emb(options["seq_length"])
    outs = []
    for lean in (True, False):
        model.decoder.lean = lean
        outs.append(model.decoder(hidden, None, rotary_pos_emb=freqs))
    assert len(lean_calls) == 1
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["nanogpt", "llama-gqa"])
def test_lean_block_under_bf16_autocast_is_as_close_to_fp32_as_megatrons(case):
    options = CASES[case]
    model, batch = _model(options), _batch(options)
    fp32_loss, fp32_grads = _run(model, batch, lean=False)
    lean_loss, lean_grads = _run(model, batch, lean=True, autocast=True)
    mega_loss, mega_grads = _run(model, batch, lean=False, autocast=True)
    lean_error, mega_error = _grad_error(lean_grads, fp32_grads), _grad_error(mega_grads, fp32_grads)
    assert lean_error < 1.5 * mega_error + 1e-3, (lean_error, mega_error)
    assert (lean_loss - fp32_loss).abs().max() < 1.5 * (mega_loss - fp32_loss).abs().max() + 2e-2


def test_megatrons_bf16_keeps_megatrons_forward(lean_calls):
    """Under megatron's bf16 every layout trains bitwise alike only through megatron's own forward."""
    from llmforge.models import lean
    from llmforge.models.init import unwrap

    options = CASES["llama-gqa"]
    model, batch = _model(options, precision="bf16"), _batch(options)
    assert "bf16" in lean.model_refusal(unwrap(model), batch[0], {"labels": batch[2]})
    _run(model, batch, lean=True)
    assert not lean_calls


def test_documents_block_causal_mask_and_restarted_positions(lean_calls):
    """Packed documents: a block-causal mask and RoPE positions that restart at each document."""
    from llmforge.runtime.documents import block_causal_mask

    options = CASES["llama-gqa"]
    model, (tokens, _, labels) = _model(options), _batch(options)
    s = options["seq_length"]
    segments = torch.tensor([[0] * 5 + [1] * (s - 5), [0] * s, [0] * 9 + [1] * 4 + [2] * (s - 13)])
    positions = torch.stack([torch.cat([torch.arange(n) for n in row.bincount().tolist()]) for row in segments])
    kwargs = dict(attention_mask=block_causal_mask(segments), document_positions=True)
    lean_loss, lean_grads = _run(model, (tokens, positions, labels), lean=True, **kwargs)
    assert lean_calls
    mega_loss, mega_grads = _run(model, (tokens, positions, labels), lean=False, **kwargs)
    torch.testing.assert_close(lean_loss, mega_loss, rtol=1e-6, atol=1e-6)
    assert _grad_error(lean_grads, mega_grads) < 1e-5


def test_a_lora_hook_sends_the_block_to_megatrons_forward(lean_calls):
    from llmforge.finetune.lora import attach_lora

    model = _model(NANOGPT)
    batch = _batch(NANOGPT)
    attach_lora([model], targets=["linear_qkv"], rank=2, alpha=4.0, dropout=0.0, seed=0)
    _run(model, batch, lean=True)
    assert not lean_calls


def test_dropout_while_training_sends_the_block_to_megatrons_forward(lean_calls):
    model = _model({**NANOGPT, "hidden_dropout": 0.1})
    batch = _batch(NANOGPT)
    _run(model, batch, lean=True)
    assert not lean_calls
    model.eval()  # no dropout at evaluation: the lean path again
    with torch.no_grad():
        model(batch[0], batch[1], None, labels=batch[2])
    assert lean_calls


def test_a_soft_prompt_hook_on_the_embedding_keeps_megatrons_model_forward(lean_calls):
    """A hook on the embedding (prompt tuning) must run: the model-level lean path stands aside, the block's may not."""
    from llmforge.models import lean

    model = _model(NANOGPT)
    tokens, positions, labels = _batch(NANOGPT)
    seen = []
    model.embedding.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    assert "hook" in lean.model_refusal(model, tokens, {"labels": labels})
    with torch.no_grad():
        model(tokens, positions, None, labels=labels)
    assert seen and lean_calls  # the hook ran, and the block still ran lean


def test_the_shakespeare_recipe_takes_the_lean_path(root):
    """The shape time_to_loss measures (issue 31) must not fall back to megatron's forward unnoticed."""
    from llmforge.models import lean
    from llmforge.spec.validate import load_and_validate

    spec, _ = load_and_validate(str(root / "specs" / "shakespeare-char.yaml"), check_inputs=False)
    options = {key: value for key, value in spec.model.model_dump().items() if key != "name"}
    model = _model(options)
    assert lean.model_refusal(model, torch.zeros(1, 1, dtype=torch.long), {"labels": None}) is None


def _decode(model, prompts: list[list[int]], new: int, *, lean: bool) -> tuple[list[list[int]], torch.Tensor, list]:
    """Greedy ids, one-shot log-probs of the prompts, and the decoders ModelServer built, lean or megatron's modules."""
    from llmforge.runtime import generate
    from llmforge.runtime.serve import ModelServer

    model.decoder.lean = lean
    built = []
    original = generate.StageDecoder.__init__

    def spy(self, *args, **kwargs):
        original(self, *args, **kwargs)
        built.append(self)

    generate.StageDecoder.__init__ = spy
    try:
        server = ModelServer([model])
        ids = server.generate(prompts, max_new_tokens=new)
        rows = torch.tensor([p[:4] for p in prompts])
        logprobs = server.logprobs(rows, micro_batch_size=len(prompts))
    finally:
        generate.StageDecoder.__init__ = original
    return ids, logprobs, built


@pytest.mark.parametrize("case", CASES)
def test_lean_decoding_gives_megatrons_tokens_and_logprobs(case):
    """StageDecoder's steps over the KV cache through lean layers: left-padded prompts of three lengths, RoPE per row."""
    options = CASES[case]
    model = _model(options)
    model.eval()
    with torch.no_grad():  # weights that make greedy ids depend on the prompt (initial ones repeat a token)
        for p in model.parameters():
            p.mul_(4.0) if p.dim() > 1 else None
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, options["vocab_size"], (n,), generator=g).tolist() for n in (5, 9, 7)]
    lean_ids, lean_lp, lean_built = _decode(model, prompts, 6, lean=True)
    mega_ids, mega_lp, mega_built = _decode(model, prompts, 6, lean=False)
    assert all(d._lean for d in lean_built) and not any(d._lean for d in mega_built)  # each side ran the path it names
    assert lean_ids == mega_ids
    assert len({t for row in lean_ids for t in row}) > 2  # the ids are not one repeated token
    torch.testing.assert_close(lean_lp, mega_lp, rtol=1e-5, atol=1e-5)


def test_a_hooked_model_decodes_through_megatrons_modules():
    from llmforge.finetune.lora import attach_lora
    from llmforge.models import lean

    model = _model(NANOGPT)
    model.eval()
    assert lean.decode_refusal(model) is None
    attach_lora([model], targets=["linear_qkv"], rank=2, alpha=4.0, dropout=0.0, seed=0)
    assert "hook" in lean.decode_refusal(model)
    _, _, built = _decode(model, [[1, 2, 3, 4]], 3, lean=True)
    assert built and not any(d._lean for d in built)


def test_an_accepted_model_is_walked_again_after_any_change():
    """model_refusal remembers an acceptance (the walk is ~400 Python calls a forward); a hook, a
    module or parameter assigned anywhere, dropout in training, or the switch must still be seen."""
    from llmforge.models import lean

    model = _model(NANOGPT)
    tokens, _, labels = _batch(NANOGPT)
    call = lambda: lean.model_refusal(model, tokens, {"labels": labels})  # noqa: E731
    assert call() is None and "_lean_accepted" in model.__dict__
    assert lean.model_refusal(model, tokens, {"labels": labels, "packed_seq_params": object()}) is not None
    layer = model.decoder.layers[1]
    handle = layer.mlp.linear_fc1.register_forward_pre_hook(lambda *args: None)
    assert call() == "a module hook (LoRA adapters, activation capture)"
    handle.remove()
    assert call() is None
    original = layer.mlp.linear_fc2
    layer.mlp.linear_fc2 = torch.nn.Linear(4 * NANOGPT["hidden_size"], NANOGPT["hidden_size"], bias=False)
    assert call() == "another linear (an adapter's replacement)"
    layer.mlp.linear_fc2 = original
    assert call() is None
    model.post_process = False  # the reward model's hidden states (finetune.reward_model)
    assert call() == "a pipeline stage or multi-token prediction"
    model.post_process = True
    assert call() is None
    model.config.hidden_dropout = 0.1
    model.train()
    assert call() == "dropout (its masks are drawn from megatron's RNG streams)"
    model.eval()
    assert call() is None
    model.config.hidden_dropout = 0.0
    model.decoder.lean = False
    assert call() == "lean layers off"
