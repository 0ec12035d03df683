"""Bad shards (promise 9): a 0-byte tar, a truncated tar, an empty shard and a checksum mismatch.

By default the error names the shard; with `data.on_error: skip` the run logs, counts and
goes on, and a kill-and-resume still reproduces the uninterrupted run exactly.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from llmforge.data.loader import TokenLoader
from llmforge.spec.errors import UserError
from tests.fault.harness import SPEC, copy_run, losses, rows


def _empty_tar() -> bytes:
    buf = io.BytesIO()
    tarfile.open(fileobj=buf, mode="w").close()
    return buf.getvalue()


def _zero_byte(path: Path) -> None:
    path.write_bytes(b"")


def _truncated(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _empty(path: Path) -> None:
    path.write_bytes(_empty_tar())  # a valid tar, with no sample in it


def _flipped(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[700] ^= 0x01  # inside the first sample's tokens: same size, another checksum
    path.write_bytes(bytes(data))


DAMAGE = {"0-byte": (2, _zero_byte, "is truncated: 0 bytes"), "truncated": (5, _truncated, "is truncated"),
          "empty": (8, _empty, "is truncated"), "checksum": (11, _flipped, "checksum mismatch")}


def damage(data_dir: Path, kinds=DAMAGE) -> list[str]:
    """Damage train shards as DAMAGE says; returns their paths."""
    out = []
    for kind in kinds:
        index, hurt, _ = DAMAGE[kind]
        path = data_dir / "train" / f"shard-{index:06d}.tar"
        hurt(path)
        out.append(str(path))
    return out


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """The fault spec's shards, prepared in this process (prepare needs no torch)."""
    from llmforge.data.prepare import run_prepare
    from llmforge.spec.validate import load_and_validate

    root = tmp_path_factory.mktemp("shards")
    (root / "spec.yaml").write_text(SPEC)
    spec, _ = load_and_validate(str(root / "spec.yaml"))
    run_prepare(spec, root / "run", spec.stages[0], log=lambda m: None)
    return root / "run" / "data"


@pytest.fixture
def data_dir(prepared, tmp_path) -> Path:
    import shutil

    return Path(shutil.copytree(prepared, tmp_path / "data"))


def _epoch(loader: TokenLoader) -> list:
    return [loader.next_global_batch() for _ in range(loader.samples_per_epoch // loader.global_batch_size)]


@pytest.mark.parametrize("kind", DAMAGE)
def test_by_default_the_error_names_the_shard(data_dir, kind):
    (path,) = damage(data_dir, [kind])
    loader = TokenLoader(data_dir, "train", global_batch_size=8, micro_batch_size=4, seed=1)
    with pytest.raises(UserError) as error:
        _epoch(loader)
    assert path in str(error.value) and DAMAGE[kind][2] in str(error.value)
    assert "on_error: skip" in error.value.hint


def test_skip_logs_counts_and_goes_on_the_same_way_after_a_resume(data_dir):
    paths = damage(data_dir)
    manifest = json.loads((data_dir / "manifest.json").read_text())
    bad_indices = {s["first_index"] + i for s in manifest["splits"]["train"]["shards"] if str(data_dir / s["path"]) in paths
                   for i in range(s["samples"])}
    logs: list[str] = []
    loader = TokenLoader(data_dir, "train", global_batch_size=8, micro_batch_size=4, seed=1, on_error="skip", log=logs.append)
    batches = _epoch(loader)
    read = loader.sample_indices(0, len(batches) * 8)
    assert loader.skipped == len(bad_indices & set(read)) > 40  # every sample of the four shards that the epoch reached
    assert len(logs) == 10 and all(line.startswith("warning: skipped") for line in logs)
    assert "further skips are only counted" in logs[-1]
    assert {p for p in paths if any(p in line for line in logs)}  # the log names the shards
    assert all(int(b.min()) >= 0 for batch in batches for b in batch)

    # A resume from the middle of the epoch reads exactly what the uninterrupted loader read.
    again = TokenLoader(data_dir, "train", global_batch_size=8, micro_batch_size=4, seed=1, on_error="skip")
    first = [again.next_global_batch() for _ in range(20)]
    state = again.state_dict()
    resumed = TokenLoader(data_dir, "train", global_batch_size=8, micro_batch_size=4, seed=1, on_error="skip")
    resumed.load_state_dict(state)
    rest = [resumed.next_global_batch() for _ in range(len(batches) - 20)]
    for want, got in zip(batches, first + rest, strict=True):
        assert all((w == g).all() for w, g in zip(want, got, strict=True))


@pytest.mark.slow
def test_a_run_names_the_shard_or_skips_and_still_resumes_exactly(llmforge, killed_copy, tmp_path):
    paths = damage(killed_copy / "data")
    refused = llmforge("--run-dir", str(killed_copy), "--resume")
    assert refused.returncode == 2, refused.output[-3000:]
    assert any(p in refused.stderr for p in paths) and "on_error: skip" in refused.stderr
    assert "Traceback" not in refused.stderr

    other = copy_run(killed_copy, tmp_path / "other")
    skip = ["--allow-spec-change", "data.on_error=skip"]
    done = llmforge("--run-dir", str(killed_copy), "--resume", *skip)
    assert done.returncode == 0, done.output[-3000:]
    assert "warning: skipped" in done.stdout and any(p in done.stdout for p in paths)
    counted = rows(killed_copy)[-1]["skipped_samples"]
    assert counted > 0

    killed = llmforge("--run-dir", str(other), "--resume", *skip, env={"LLMFORGE_FAULT": "train_step@15"})  # at step 35
    assert killed.returncode == -9, killed.output[-3000:]
    resumed = llmforge("--run-dir", str(other), "--resume", *skip)
    assert resumed.returncode == 0, resumed.output[-3000:]
    assert "step-30 at step 30" in resumed.stdout
    assert losses(other) == losses(killed_copy)  # bitwise, the skips included
    assert rows(other)[-1]["skipped_samples"] == counted
