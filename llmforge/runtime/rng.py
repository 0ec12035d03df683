"""Per-rank RNG streams in checkpoints: torch's CPU (and CUDA) generators and megatron's tracker.

Each rank saves its own file, `rng/rank-XXXXX.pt`, which also records how many ranks saved.
A rank of the saving world must find its file on resume. A rank the saving world did not
have (a resume on more ranks) reseeds torch's generators from (seed, step, rank), which is
deterministic though not identical; megatron's tracker keeps the streams `init_distributed`
seeded.
"""

from __future__ import annotations

from pathlib import Path

from llmforge.spec.errors import UserError

RNG_VERSION = 2  # 2 added `world_size`; version 1 files are still read


class RngState:
    """This rank's RNG streams.

    Args:
        world_size: ranks of the running job, recorded in each file so that a resume knows
            which ranks' files the checkpoint holds.
    """

    def __init__(self, seed: int, world_size: int = 1):
        self.seed = seed
        self.world_size = world_size

    def state_dict(self) -> dict:
        import torch
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

        state = {"version": RNG_VERSION, "world_size": self.world_size, "cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state()
        tracker = get_cuda_rng_tracker()
        if tracker.is_initialized():  # False only before model-parallel seeding, when it holds no stream
            state["tracker"] = tracker.get_states()
        return state

    def load_state_dict(self, state: dict) -> None:
        import torch

        if state.get("version") not in (1, RNG_VERSION):
            raise ValueError(f"RNG state version {state.get('version')}; this llmforge reads 1 and {RNG_VERSION}")
        torch.set_rng_state(state["cpu"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])
        if "tracker" in state:
            from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

            get_cuda_rng_tracker().set_states(state["tracker"])

    def save(self, ckpt_dir: Path, rank: int) -> None:
        import torch

        (ckpt_dir / "rng").mkdir(exist_ok=True)
        torch.save(self.state_dict(), _path(ckpt_dir, rank))

    def load(self, ckpt_dir: Path, rank: int, step: int) -> str | None:
        """Restore this rank's streams from the checkpoint of `step`.

        Returns, on rank 0 of a job larger than the saving one, the line to log about the
        ranks that reseeded. Raises UserError when a file the saving world wrote is missing.
        """
        import torch

        path = _path(ckpt_dir, rank)
        if path.exists():
            state = torch.load(path, weights_only=True)
            self.load_state_dict(state)
            saved = state.get("world_size") or _count(ckpt_dir)
        else:
            saved = _saved_world_size(ckpt_dir)
            if rank < saved:
                raise UserError(f"{path} is missing: the checkpoint was saved by {saved} rank(s), rank {rank} among them",
                                "restore the file, or move this checkpoint away to resume from an earlier one")
            torch.manual_seed(self.seed * 1_000_003 + step * 101 + rank)
        if rank == 0 and self.world_size > saved:
            first = str(saved) if self.world_size - saved == 1 else f"{saved}-{self.world_size - 1}"
            return (f"rank(s) {first} have no RNG state in {ckpt_dir / 'rng'} (saved by {saved} rank(s)): "
                    f"reseeded from (seed, step {step}, rank)")
        return None


def _path(ckpt_dir: Path, rank: int) -> Path:
    return ckpt_dir / "rng" / f"rank-{rank:05d}.pt"


def _count(ckpt_dir: Path) -> int:
    """Version 1 files do not record the saving world: count them."""
    return len(list((ckpt_dir / "rng").glob("rank-*.pt")))


def _saved_world_size(ckpt_dir: Path) -> int:
    """How many ranks saved the checkpoint, from rank 0's file (every saving world has a rank 0)."""
    import torch

    first = _path(ckpt_dir, 0)
    if not first.exists():
        raise UserError(f"{first} is missing: every checkpoint holds rank 0's RNG state",
                        "restore the file, or move this checkpoint away to resume from an earlier one")
    return torch.load(first, weights_only=True).get("world_size") or _count(ckpt_dir)
