"""Layout-invariant initialization: every TP/PP/VPP/DP layout starts from identical weights.

Each weight is drawn row by row along its TP partition dimension, and each row has its own
generator seeded from (seed, global parameter name, global row index). A rank therefore
fills exactly its own shard, in any layout, without the full tensor ever existing on it:
a 7B model initializes with only its shard in memory. Global names map local layer `i` to
`layer_number - 1`; a tied output layer is drawn as the word embedding it mirrors.

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
_RESIDUAL_OUTPUTS = ("self_attention.linear_proj.weight", "mlp.linear_fc2.weight")
_GOLDEN = 0x9E3779B97F4A7C15  # spreads consecutive row indices over the seed space
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
        return f"decoder.layers.{layer.layer_number - 1}.{match.group(2)}"
    if name == "output_layer.weight" and getattr(model, "share_embeddings_and_output_weights", False):
        return "embedding.word_embeddings.weight"
    return name


def global_rows(param: torch.nn.Parameter, tp_rank: int, tp_size: int) -> tuple[int, torch.Tensor]:
    """(partition dim, global index of each local row along it) for a TP-sharded parameter.

    megatron splits the master tensor into `tp_size * stride` chunks and gives rank r the
    chunks r, r + tp_size, ...: stride 2 keeps fused SwiGLU gate and up halves together.
    """
    dim = getattr(param, "partition_dim", 0) if getattr(param, "tensor_model_parallel", False) else 0
    local = param.shape[dim]
    if not getattr(param, "tensor_model_parallel", False) or tp_size == 1:
        return dim, torch.arange(local)
    stride = getattr(param, "partition_stride", 1)
    chunk = local // stride
    index = torch.arange(local)
    return dim, ((index // chunk) * tp_size + tp_rank) * chunk + index % chunk


def _row_seed(seed: int, name: str, row: int, base_cache: dict[str, int]) -> int:
    base = base_cache.get(name)
    if base is None:
        digest = hashlib.blake2b(f"{seed}/{name}".encode(), digest_size=8).digest()
        base = base_cache[name] = int.from_bytes(digest, "little")
    return (base + row * _GOLDEN) & _MASK64


def _normal_by_rows(shape: torch.Size, dim: int, rows: torch.Tensor, std: float, seed: int, name: str, cache: dict[str, int]) -> torch.Tensor:
    out = torch.empty(shape, dtype=torch.float32)
    view = out.movedim(dim, 0)
    row_numel = view[0].numel() if len(view) else 0
    generator = torch.Generator()
    for local, row in enumerate(rows.tolist()):
        generator.manual_seed(_row_seed(seed, name, row, cache))
        view[local].copy_(torch.randn(row_numel, generator=generator).view_as(view[local]))
    return out.mul_(std)


@torch.no_grad()
def initialize(model_chunks: list[torch.nn.Module], *, num_layers: int, init_method_std: float, seed: int) -> None:
    """Fill every parameter of this rank's chunks from the layout-independent streams."""
    from megatron.core import parallel_state

    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
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
                dim, rows = global_rows(param, tp_rank, tp_size)
                param.copy_(_normal_by_rows(param.shape, dim, rows, std, seed, gname, cache))
            else:
                raise ValueError(f"no initialization rule for parameter {gname!r} of shape {tuple(param.shape)}")
