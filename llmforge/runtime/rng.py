"""Per-rank RNG streams in checkpoints: torch's CPU (and CUDA) generators and megatron's tracker.

Each rank saves its own file. Resuming at another layout has no matching file for some
ranks; they reseed from (seed, step, rank), which is deterministic though not identical.
"""

from __future__ import annotations

from pathlib import Path

RNG_VERSION = 1


class RngState:
    def __init__(self, seed: int):
        self.seed = seed

    def state_dict(self) -> dict:
        import torch

        state = {"version": RNG_VERSION, "cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state()
        try:
            from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

            state["tracker"] = get_cuda_rng_tracker().get_states()
        except Exception:  # tracker not initialized (no model-parallel setup)
            pass
        return state

    def load_state_dict(self, state: dict) -> None:
        import torch

        if state.get("version") != RNG_VERSION:
            raise ValueError(f"RNG state version {state.get('version')} is not {RNG_VERSION}")
        torch.set_rng_state(state["cpu"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])
        if "tracker" in state:
            from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

            get_cuda_rng_tracker().set_states(state["tracker"])

    def save(self, ckpt_dir: Path, rank: int) -> None:
        import torch

        (ckpt_dir / "rng").mkdir(exist_ok=True)
        torch.save(self.state_dict(), ckpt_dir / "rng" / f"rank-{rank:05d}.pt")

    def load(self, ckpt_dir: Path, rank: int, step: int = 0) -> bool:
        import torch

        path = ckpt_dir / "rng" / f"rank-{rank:05d}.pt"
        if not path.exists():
            torch.manual_seed(self.seed * 1_000_003 + step * 101 + rank)
            return False
        self.load_state_dict(torch.load(path, weights_only=True))
        return True
