"""Tiny models on both sides: llmforge run dirs as training leaves them, and HF directories
that transformers itself wrote. fp32 on CPU, 2 layers, hidden 64."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmforge.models.presets import shrink

VOCAB = 320  # the byte tokenizer's 256 bytes + 6 special tokens fit
SEQ = 32

# The two shapes, plus the switches each can flip: GQA, untied output, biases on Llama.
MODELS: dict[str, dict[str, Any]] = {
    "llama": shrink("llama2-7b", vocab_size=VOCAB, num_query_groups=2, ffn_hidden_size=96, rotary_base=5000, norm_epsilon=1e-6),
    "gpt2": shrink("gpt2-124m", vocab_size=VOCAB),
}


def byte_tokenizer():
    from llmforge.data.tokenizers import build_byte
    from llmforge.spec.components import ByteTokenizer

    return build_byte(ByteTokenizer.model_validate({}), run_dir=Path("."), texts=[])


def _global_index(param, tp_rank: int, tp_size: int):
    """Global index of each element of a 1-D parameter, from megatron's TP split rule.

    megatron cuts the full tensor into `tp_size * stride` chunks and gives rank r the
    chunks r, r + tp_size, ... (stride 2 keeps SwiGLU's gate and up halves together).
    """
    import torch

    index = torch.arange(param.shape[0])
    if not getattr(param, "tensor_model_parallel", False) or tp_size == 1:
        return index
    chunk = param.shape[0] // getattr(param, "partition_stride", 1)
    return ((index // chunk) * tp_size + tp_rank) * chunk + index % chunk


def _global_name(module, name: str) -> str:
    """`decoder.layers.<local>.x` → `decoder.layers.<global>.x` (a PP stage numbers its layers from 0)."""
    parts = name.split(".")
    if parts[:2] == ["decoder", "layers"]:
        parts[2] = str(module.decoder.layers[int(parts[2])].layer_number - 1)
    return ".".join(parts)


def perturb(module, *, tp_rank: int = 0, tp_size: int = 1) -> None:
    """Give an llmforge model's norms and biases values that differ per element and per tensor.

    At their init (ones, zeros) a swapped or misplaced one goes unseen. The values depend
    only on the global name and index, so every TP/PP layout gets the same ones.
    """
    import zlib

    import torch

    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() == 1:
                salt = zlib.crc32(_global_name(module, name).encode()) % 997
                p.add_(0.2 * torch.sin(_global_index(p, tp_rank, tp_size).float() * 0.7 + salt))


def perturb_hf(model) -> None:
    """The same for a transformers model (whose norms start at one and biases at zero)."""
    import torch

    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)


def forward(module, ids):
    """llmforge's own forward pass: megatron's GPTModel, full logits [batch, seq, vocab]."""
    import torch

    module.eval()
    positions = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
    with torch.no_grad():
        return module(ids, positions, None)


def random_ids(batch: int = 2, seq: int = SEQ, vocab: int = VOCAB, seed: int = 0):
    import torch

    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def write_run(run_dir: Path, options: dict[str, Any], module, *, stage: str = "pretrain", step: int = 3,
              tokenizer=True) -> Path:
    """What a training run leaves: spec.resolved.yaml, tokenizer/, checkpoints/<stage>/step-N/."""
    import yaml

    from llmforge.runtime.checkpoint import CheckpointManager
    from llmforge.runtime.sharded_io import save_sharded

    run_dir.mkdir(parents=True, exist_ok=True)
    spec = {"name": "t", "model": {"name": "gpt", **options},
            "stages": [{"name": "prepare", "type": "prepare"}, {"name": stage, "type": "pretrain"}]}
    (run_dir / "spec.resolved.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    if tokenizer:
        byte_tokenizer().save(run_dir / "tokenizer")

    def write(tmp: Path) -> None:
        (tmp / "model").mkdir()
        save_sharded(tmp / "model", [module], None, {})

    state = {"version": 1, "stage": stage, "step": step, "tokens": 0, "skipped": 0, "extra": {}, "loader": None}
    return CheckpointManager(run_dir / "checkpoints" / stage, keep_last=1, log=lambda m: None).save(step, write, state)


def build(options: dict[str, Any], seed: int = 5):
    """A TP=1/PP=1 llmforge model with random weights (norms and biases too)."""
    from llmforge.interop.model_io import single_process_model
    from llmforge.spec.components import GPTModel

    module = single_process_model(GPTModel.model_validate(options), seed=seed)
    perturb(module)
    return module


def hf_model(arch: str, *, tied: bool | None = None, dtype=None, **config):
    """A random HF model made by transformers itself, with non-trivial norms and biases."""
    import torch
    import transformers

    torch.manual_seed(3)
    if arch == "llama":
        defaults = {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 96,
                    "vocab_size": VOCAB, "max_position_embeddings": SEQ, "rope_theta": 5000.0, "tie_word_embeddings": bool(tied)}
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**defaults, **config}, bos_token_id=None, eos_token_id=None))
    else:
        defaults = {"n_layer": 2, "n_embd": 64, "n_head": 4, "vocab_size": VOCAB, "n_positions": SEQ,
                    "tie_word_embeddings": True if tied is None else tied}
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**{**defaults, **config}, bos_token_id=None, eos_token_id=None))
    perturb_hf(model)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


def save_hf(model, path: Path, *, tokenizer: bool = True) -> Path:
    from llmforge.interop.hf_files import write_tokenizer_files

    model.save_pretrained(path)
    if tokenizer:
        write_tokenizer_files(path, byte_tokenizer(), model_max_length=SEQ)
    return path


def run_two_ranks(worker: Path, args: dict[str, Any]) -> None:
    """Run `worker args_json` as ranks 0 and 1 of a gloo job on loopback; fail with a rank's output."""
    import json
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, str(worker), json.dumps(args)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    try:
        outputs = [p.communicate(timeout=300)[0].decode(errors="replace") for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for rank, (p, out) in enumerate(zip(procs, outputs, strict=True)):
        assert p.returncode == 0, f"rank {rank} failed:\n{out[-4000:]}"


def save_gathered_logits(module, run_dir: Path, *, rank: int, tp_size: int) -> None:
    """Rank 0 saves the full-vocabulary logits of `module` on `random_ids()` (a collective over the TP group)."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    local = forward(module, random_ids())  # vocab-parallel: this rank's slice of the vocabulary
    parts = [torch.empty_like(local) for _ in range(tp_size)]
    dist.all_gather(parts, local.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
    if rank == 0:
        torch.save(torch.cat(parts, dim=-1), run_dir / "logits.pt")
