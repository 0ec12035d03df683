"""Kill and resume (promise 2), a corrupt checkpoint (6) and seeds (11), on one process."""

from __future__ import annotations

import pytest

from tests.fault.harness import assert_same_weights, cold, losses, rows, steps_saved

pytestmark = pytest.mark.slow


def test_sigkill_at_step_27_then_resume_is_bitwise(llmforge, reference, killed_copy):
    run = killed_copy
    assert steps_saved(run) == [10, 20]
    assert max(losses(run)) == 26  # killed inside step 27, before its row

    resumed = llmforge("--run-dir", str(run), "--resume")
    assert resumed.returncode == 0, resumed.output[-4000:]
    assert "resumed from" in resumed.stdout and "step-20" in resumed.stdout

    want, got = losses(reference), losses(run)
    assert list(got) == list(range(1, 41))
    assert [got[s] for s in range(21, 41)] == [want[s] for s in range(21, 41)]  # bitwise: the same floats
    assert [r["val_loss"] for r in rows(run, "eval")] == [r["val_loss"] for r in rows(reference, "eval")]
    assert_same_weights(run / "checkpoints/pretrain/step-40", reference / "checkpoints/pretrain/step-40")


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupt_checkpoint_falls_back_to_the_previous_one(llmforge, reference, killed_copy, damage):
    shard = killed_copy / "checkpoints/pretrain/step-20/model/__0_0.distcp"
    data = bytearray(shard.read_bytes())
    if damage == "truncate":
        shard.write_bytes(bytes(data[: len(data) // 2]))
    else:
        data[len(data) // 3] ^= 0x01
        shard.write_bytes(bytes(data))

    resumed = llmforge("--run-dir", str(killed_copy), "--resume")
    assert resumed.returncode == 0, resumed.output[-4000:]
    assert "corrupt checkpoint skipped" in resumed.stdout and "__0_0.distcp" in resumed.stdout
    # "resumed from" is said once, after the checksums, of the checkpoint used (issue 33): never of the corrupt step-20.
    said = [line for line in resumed.stdout.splitlines() if "resumed from" in line]
    assert len(said) == 1 and said[0].endswith("checkpoints/pretrain/step-10 at step 10"), said
    assert resumed.stdout.index("corrupt checkpoint skipped") < resumed.stdout.index("resumed from")
    want, got = losses(reference), losses(killed_copy)
    assert [got[s] for s in range(11, 41)] == [want[s] for s in range(11, 41)]


def test_corrupt_checkpoint_stops_when_told_to(llmforge, killed_copy):
    shard = killed_copy / "checkpoints/pretrain/step-20/model/__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:-100])
    stopped = llmforge("--run-dir", str(killed_copy), "--resume", "--allow-spec-change", "checkpoint.on_corrupt=stop")
    assert stopped.returncode == 2, stopped.output[-4000:]
    assert "corrupt checkpoint" in stopped.stderr and "step-20" in stopped.stderr and "__0_0.distcp" in stopped.stderr
    assert "on_corrupt" in stopped.stderr  # the hint names the way out
    assert max(losses(killed_copy)) == 26  # nothing trained, nothing truncated


def test_same_seed_same_losses_other_seed_other_losses(llmforge, reference, spec, tmp_path):
    # A cold interpreter, not a fork of the warm one: nothing in the process may leak into the numbers.
    again = cold("run", str(spec), "--run-dir", str(tmp_path / "again"))
    assert again.returncode == 0, again.output[-4000:]
    assert losses(tmp_path / "again") == losses(reference)

    other = llmforge("--run-dir", str(tmp_path / "other"), "seed=7", "stages.1.train.max_steps=5")
    assert other.returncode == 0, other.output[-4000:]
    mine = losses(reference)
    assert all(loss != mine[step] for step, loss in losses(tmp_path / "other").items())


def test_the_seed_lives_in_the_checkpoint(llmforge, killed_copy):
    import json

    state = json.loads((killed_copy / "checkpoints/pretrain/step-20/trainer_state.json").read_text())
    assert state["seed"] == 1234 and state["loader"]["seed"] == 1234
    assert len(list((killed_copy / "checkpoints/pretrain/step-20/rng").glob("rank-*.pt"))) == 1
    other = llmforge("--run-dir", str(killed_copy), "--resume", "--allow-spec-change", "seed=7")
    assert other.returncode == 2, other.output[-4000:]
    assert "trained with seed 1234" in other.stderr and "seed: 1234" in other.stderr
