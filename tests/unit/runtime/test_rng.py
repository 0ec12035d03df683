"""Per-rank RNG state in checkpoints: the tracker is saved or the save fails; a missing file
is an error when the saving world wrote it, and a reseed from (seed, step, rank) when it did not."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from llmforge.runtime.rng import RngState
from llmforge.runtime.train import Loop
from llmforge.spec.errors import UserError

SEED, STEP = 5, 7


@pytest.fixture
def tracker(monkeypatch):
    """A fresh megatron RNG tracker (the CPU one), put back after the test."""
    from megatron.core.tensor_parallel import random

    from llmforge.models import cpu_compat

    cpu_compat.install()
    fresh = type(random.get_cuda_rng_tracker())()
    monkeypatch.setattr(random, "_CUDA_RNG_STATE_TRACKER", fresh)
    return fresh


def test_the_tracker_streams_are_saved_and_restored(tmp_path, tracker):
    tracker.add("model-parallel-rng", 1234)
    RngState(SEED).save(tmp_path, 0)
    with tracker.fork("model-parallel-rng"):
        first = torch.rand(4)
    default = torch.rand(4)
    RngState(SEED).load(tmp_path, 0, step=STEP)
    with tracker.fork("model-parallel-rng"):
        assert torch.equal(torch.rand(4), first)
    assert torch.equal(torch.rand(4), default)


def test_a_tracker_that_cannot_be_read_fails_the_save(tmp_path, tracker, monkeypatch):
    tracker.add("model-parallel-rng", 1234)

    def broken():
        raise RuntimeError("tracker state unreadable")

    monkeypatch.setattr(tracker, "get_states", broken)
    with pytest.raises(RuntimeError, match="tracker state unreadable"):
        RngState(SEED).save(tmp_path, 0)


def test_an_uninitialized_tracker_is_left_out(tracker):
    assert not tracker.is_initialized()
    assert "tracker" not in RngState(SEED).state_dict()


def _checkpoint(tmp_path, saved_by: int, step: int = STEP):
    """A checkpoint dir of `step` whose rng/ was written by `saved_by` ranks."""
    step_dir = tmp_path / f"step-{step}"
    step_dir.mkdir()
    state = {"version": 1, "seed": SEED, "step": step, "tokens": 0, "skipped": 0, "loader": {}}
    (step_dir / "trainer_state.json").write_text(json.dumps(state))
    for rank in range(saved_by):
        RngState(SEED, world_size=saved_by).save(step_dir, rank)
    return step_dir


def _restore(step_dir, *, rank: int, world_size: int) -> list[str]:
    """Loop.restore on `rank` of a `world_size` job, then its announcement; returns its log lines."""
    log: list[str] = []
    loop = Loop(stage="pretrain", train=None, total=100, step_fn=None, loader=SimpleNamespace(load_state_dict=lambda s: None),
                schedule=None, evaluate=None, metrics=None, log=log.append, ckpt=None, checkpoint_interval=None, save_model=None,
                load_model=lambda d: None, rng=RngState(SEED, world_size=world_size), tokens_per_step=1, flops_per_token=0.0,
                peak_flops=0.0, rank=rank, memory_fn=None, log_interval=1)
    loop.restore(step_dir)
    assert log == []  # nothing is said until the checkpoint is the one used
    loop.announce_resume(step_dir)
    return log


@pytest.mark.parametrize("rank", [0, 1])
def test_a_missing_rng_file_at_the_saved_layout_is_an_error_naming_it(tmp_path, rank):
    step_dir = _checkpoint(tmp_path, saved_by=2)
    (step_dir / "rng" / f"rank-{rank:05d}.pt").unlink()
    with pytest.raises(UserError, match=rf"rank-{rank:05d}\.pt is missing"):
        _restore(step_dir, rank=rank, world_size=2)


def test_a_rank_the_saving_world_lacked_reseeds_from_seed_step_and_rank(tmp_path):
    def draws(step_dir, rank: int) -> torch.Tensor:
        _restore(step_dir, rank=rank, world_size=3)
        return torch.rand(4)

    at_7, at_8 = _checkpoint(tmp_path, saved_by=1, step=7), _checkpoint(tmp_path, saved_by=1, step=8)
    assert torch.equal(draws(at_7, 1), draws(at_7, 1))  # deterministic
    assert not torch.equal(draws(at_7, 1), draws(at_7, 2))  # per rank
    assert not torch.equal(draws(at_7, 1), draws(at_8, 1))  # per checkpoint step


def test_rank_0_logs_one_line_for_the_ranks_that_reseeded(tmp_path):
    step_dir = _checkpoint(tmp_path, saved_by=1)
    notes = [line for line in _restore(step_dir, rank=0, world_size=3) if "RNG" in line]
    assert notes == [f"[pretrain] rank(s) 1-2 have no RNG state in {step_dir / 'rng'} (saved by 1 rank(s)): "
                     f"reseeded from (seed, step {STEP}, rank)"]
    assert not [line for line in _restore(step_dir, rank=1, world_size=3) if "RNG" in line]
    assert not [line for line in _restore(step_dir, rank=0, world_size=1) if "RNG" in line]


def test_version_1_files_still_load_and_count_as_the_saving_world(tmp_path):
    step_dir = _checkpoint(tmp_path, saved_by=0)
    (step_dir / "rng").mkdir()
    for rank in range(2):  # as written before files recorded the saving world's size
        torch.save({"version": 1, "cpu": torch.Generator().manual_seed(rank).get_state()}, step_dir / "rng" / f"rank-{rank:05d}.pt")
    notes = [line for line in _restore(step_dir, rank=0, world_size=3) if "RNG" in line]
    assert torch.equal(torch.get_rng_state(), torch.Generator().manual_seed(0).get_state())
    assert len(notes) == 1 and "rank(s) 2 have no RNG state" in notes[0]
