"""Session fixtures of the fault suite: the warm fork server and the reference runs every test compares against."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fault.harness import SFT_SPEC, SPEC, ForkServer, Runner, copy_run


@pytest.fixture(scope="session")
def fault_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fault")


@pytest.fixture(scope="session")
def spec(fault_dir) -> Path:
    path = fault_dir / "fault.yaml"
    path.write_text(SPEC)
    return path


@pytest.fixture(scope="session")
def sft_spec(fault_dir) -> Path:
    path = fault_dir / "fault-sft.yaml"
    path.write_text(SFT_SPEC)
    return path


@pytest.fixture(scope="session")
def llmforge(fault_dir, spec):
    logs = fault_dir / "logs"
    logs.mkdir()
    server = ForkServer(logs)
    yield Runner(server, spec)
    server.close()


@pytest.fixture(scope="session")
def reference(llmforge, fault_dir) -> Path:
    """40 steps on one process, uninterrupted, a checkpoint every 10."""
    run_dir = fault_dir / "reference"
    done = llmforge("--run-dir", str(run_dir))
    assert done.returncode == 0, done.output[-4000:]
    return run_dir


@pytest.fixture(scope="session")
def killed_at_27(llmforge, fault_dir) -> Path:
    """The same run SIGKILLed after step 27 (complete checkpoints at 10 and 20). Tests resume copies of it."""
    run_dir = fault_dir / "killed-27"
    killed = llmforge("--run-dir", str(run_dir), env={"LLMFORGE_FAULT": "train_step@27"})
    assert killed.returncode == -9, killed.output[-4000:]
    return run_dir


@pytest.fixture
def killed_copy(killed_at_27, tmp_path) -> Path:
    return copy_run(killed_at_27, tmp_path / "run")
