"""Layout-invariant initialization: every TP/PP/VPP/DP layout starts from identical weights.

Each weight is drawn in blocks of rows along its TP partition dimension, and each block has
its own generator seeded from (seed, global parameter name, block index). Block size
depends only on the global shape, chosen so that every tensor-parallel split (any degree
up to 64 made of the primes 2, 3, 5, 7) falls on block boundaries. A rank therefore fills
exactly its own shard, in any layout, without the full tensor ever existing on it: a 7B
model initializes with only its shard in memory. Global names map local layer `i` to
`layer_number - 1` and local expert `i` on expert-parallel rank `r` to global expert
`r × experts_per_rank + i` (its expert-tensor-parallel shard drawn like a TP shard); a tied
output layer is drawn as the word embedding it mirrors.

The scheme is megatron's: normal(0, init_method_std) for matrices, the two residual output
projections scaled by 1/sqrt(2 * num_layers), norms one and biases zero. Values are drawn
on the CPU generator, so CPU and GPU runs start from the same weights too.
"""

from __future__ import annotations

import hashlib
import math
import re

import torch

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")
_LOCAL_EXPERT = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(.*)$")
# megatron's output_layer_init_method: attention's and every MLP's (dense, expert, shared) second projection.
_RESIDUAL_OUTPUTS = ("self_attention.linear_proj.weight", "linear_fc2.weight")
_GOLDEN = 0x9E3779B97F4A7C15  # spreads consecutive block indices over the seed space
_MASK64 = (1 << 64) - 1


def unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside DDP (or any `.module`) wrappers."""
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def global_name(model: torch.nn.Module, name: str) -> str:
    """`decoder.layers.<local>.x` → `decoder.layers.<global>.x`; a tied output layer → the embedding."""
    match = _LAYER.match(name)
    if match:
        layer = model.decoder.layers[int(match.group(1))]
        rest = match.group(2)
        expert = _LOCAL_EXPERT.match(rest)
        if expert:
            rest = f"mlp.experts.local_experts.{layer.mlp.local_expert_indices[int(expert.group(1))]}.{expert.group(2)}"
        return f"decoder.layers.{layer.layer_number - 1}.{rest}"
    if name == "output_layer.weight" and getattr(model, "share_embeddings_and_output_weights", False):
        return "embedding.word_embeddings.weight"
    return name


# Every TP degree dividing this (2**6 * 3 * 5 * 7) splits a dimension on a block boundary.
_SPLITS = 6720


def global_rows(param: torch.nn.Parameter, tp_rank: int, tp_size: int) -> tuple[int, torch.Tensor, int]:
    """(partition dim, global index of each local row along it, rows per stride part).

    megatron splits the master tensor into `tp_size * stride` chunks and gives rank r the
    chunks r, r + tp_size, ...: stride 2 keeps fused SwiGLU gate and up halves together.
    """
    parallel = getattr(param, "tensor_model_parallel", False) and tp_size > 1
    dim = param.partition_dim if getattr(param, "tensor_model_parallel", False) else 0
    local = param.shape[dim]
    stride = getattr(param, "partition_stride", 1)
    index = torch.arange(local)
    if not parallel:
        return dim, index, local // stride
    chunk = local // stride
    return dim, ((index // chunk) * tp_size + tp_rank) * chunk + index % chunk, chunk * tp_size


def _block_seed(seed: int, name: str, block: int, base_cache: dict[str, int]) -> int:
    base = base_cache.get(name)
    if base is None:
        digest = hashlib.blake2b(f"{seed}/{name}".encode(), digest_size=8).digest()
        base = base_cache[name] = int.from_bytes(digest, "little")
    return (base + block * _GOLDEN) & _MASK64


def _fill_normal(param: torch.nn.Parameter, tp_rank: int, tp_size: int, std: float, seed: int, name: str, cache: dict[str, int]) -> None:
    dim, rows, part = global_rows(param, tp_rank, tp_size)
    block = part // math.gcd(part, _SPLITS)
    # Drawn in fp32 on the CPU generator: a GPU or bf16 shard is staged through an fp32 host
    # tensor, so a bf16 weight is the fp32 draw rounded.
    staged = param.device.type != "cpu" or param.dtype != torch.float32
    target = torch.empty(param.shape, dtype=torch.float32) if staged else param.data
    view = target.movedim(dim, 0)
    generator = torch.Generator()
    for start in range(0, len(rows), block):
        generator.manual_seed(_block_seed(seed, name, int(rows[start]) // block, cache))
        rows_view = view[start : start + block]
        # normal_ on contiguous memory of the block's shape, in every layout, so the same
        # block gets the same numbers however the tensor around it is sharded.
        if rows_view.is_contiguous():
            rows_view.normal_(0.0, std, generator=generator)
        else:
            rows_view.copy_(torch.empty(rows_view.shape, dtype=torch.float32).normal_(0.0, std, generator=generator))
    if staged:
        param.data.copy_(target)


@torch.no_grad()
def initialize(model_chunks: list[torch.nn.Module], *, num_layers: int, init_method_std: float, seed: int) -> None:
    """Fill every parameter of this rank's chunks from the layout-independent streams."""
    from megatron.core import parallel_state

    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    # Routed experts are split over the expert-tensor-parallel group instead.
    etp_rank = parallel_state.get_expert_tensor_parallel_rank()
    etp_size = parallel_state.get_expert_tensor_parallel_world_size()
    output_std = init_method_std / math.sqrt(2.0 * num_layers)
    cache: dict[str, int] = {}
    for chunk in model_chunks:
        model = unwrap(chunk)
        for name, param in model.named_parameters():
            gname = global_name(model, name)
            if name.endswith("bias"):
                param.zero_()
            elif "norm" in name and param.dim() == 1:
                param.fill_(1.0)
            elif param.dim() >= 2:
                std = output_std if gname.endswith(_RESIDUAL_OUTPUTS) else init_method_std
                expert = not getattr(param, "allreduce", True)
                _fill_normal(param, etp_rank if expert else tp_rank, etp_size if expert else tp_size, std, seed, gname, cache)
            else:
                raise ValueError(f"no initialization rule for parameter {gname!r} of shape {tuple(param.shape)}")
