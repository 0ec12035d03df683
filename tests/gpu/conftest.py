"""Fixtures of the GPU tests: one process group for the whole session (nccl on a GPU)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def parallel_ctx():
    """torch.distributed and megatron's parallel state for one rank, torn down at the end."""
    from llmforge.runtime.distributed import init_distributed, shutdown
    from llmforge.spec.schema import ParallelismConfig

    ctx = init_distributed(ParallelismConfig(), seed=1234)
    yield ctx
    shutdown()
