"""Layout-invariant initialization: TP shards of any degree reassemble to the one-rank tensor."""

from __future__ import annotations

import pytest
import torch

from llmforge.models.init import _fill_normal, global_rows


def _param(shape: tuple[int, ...], *, dim: int | None, stride: int = 1) -> torch.nn.Parameter:
    param = torch.nn.Parameter(torch.empty(shape))
    if dim is not None:  # megatron's tags on a tensor-parallel weight
        param.tensor_model_parallel, param.partition_dim, param.partition_stride = True, dim, stride
    return param


def _shard(full_shape, dim, stride, tp, rank, name="w", seed=7) -> torch.Tensor:
    shape = list(full_shape)
    shape[dim] //= tp
    param = _param(tuple(shape), dim=dim, stride=stride)
    _fill_normal(param, rank, tp, 0.02, seed, name, {})
    return param.detach()


def _megatron_gather(parts: list[torch.Tensor], dim: int, stride: int) -> torch.Tensor:
    """megatron's layout: each rank holds chunks r, r + tp, ... of local/stride rows."""
    pieces = [part.split(part.shape[dim] // stride, dim=dim) for part in parts]
    return torch.cat([pieces[rank][s] for s in range(stride) for rank in range(len(parts))], dim=dim)


SHAPES = [
    ((96, 16), 0, 1),  # column parallel (QKV, embedding)
    ((2 * 48, 16), 0, 2),  # fused SwiGLU gate/up
    ((16, 96), 1, 1),  # row parallel (attention and MLP outputs)
    ((2 * 172, 8), 0, 2),  # an odd width: 172 = 4 × 43
]


@pytest.mark.parametrize(
    "full_shape, dim, stride, tp",
    [(*shape, tp) for shape in SHAPES for tp in (2, 3, 4) if (shape[0][shape[1]] // shape[2]) % tp == 0],
)
def test_shards_reassemble_to_the_single_rank_tensor(full_shape, dim, stride, tp):
    single = _shard(full_shape, dim, stride, 1, 0)
    parts = [_shard(full_shape, dim, stride, tp, rank) for rank in range(tp)]
    assert torch.equal(_megatron_gather(parts, dim, stride), single)


def test_streams_depend_on_seed_and_name_and_have_the_asked_std():
    base = _shard((512, 64), 0, 1, 1, 0)
    assert not torch.equal(base, _shard((512, 64), 0, 1, 1, 0, seed=8))
    assert not torch.equal(base, _shard((512, 64), 0, 1, 1, 0, name="other"))
    assert abs(base.std().item() - 0.02) < 0.001 and abs(base.mean().item()) < 0.001
    # Blocks are distinct streams, not one block repeated.
    assert not torch.equal(base[:64], base[64:128])


def test_global_rows_follow_megatron_strides():
    gate_up = _param((8, 4), dim=0, stride=2)  # rank 1 of TP 2 over a 2 × 8-row master
    dim, rows, part = global_rows(gate_up, 1, 2)
    assert dim == 0 and part == 8
    assert rows.tolist() == [4, 5, 6, 7, 12, 13, 14, 15]
    replicated = _param((5, 3), dim=None)
    assert global_rows(replicated, 1, 2)[1].tolist() == [0, 1, 2, 3, 4]
