"""The fault-injection points' syntax (llmforge/runtime/faults.py), which the fault suite relies on."""

from __future__ import annotations

import pytest

from llmforge.runtime import faults


@pytest.fixture
def stalls(monkeypatch):
    """The seconds of each `stall` action taken, instead of sleeping; and fresh visit counts."""
    taken: list[float | None] = []

    class Event:
        def wait(self, seconds=None):
            taken.append(seconds)

    monkeypatch.setattr(faults.threading, "Event", Event)
    monkeypatch.setattr(faults, "_COUNTS", {})
    return taken


def test_a_fault_acts_on_the_nth_visit_of_its_point_only(monkeypatch, stalls):
    monkeypatch.setenv("LLMFORGE_FAULT", "train_step@3:stall=2")
    for _ in range(5):
        faults.fault_point("train_step")
        faults.fault_point("evaluate")
    assert stalls == [2.0]


def test_several_faults_each_act_at_their_own_point_and_visit(monkeypatch, stalls):
    monkeypatch.setenv("LLMFORGE_FAULT", "ckpt_after_shard@1:stall=4,train_step@2:stall=1,train_step@3:stall")
    faults.fault_point("ckpt_after_shard")
    assert stalls == [4.0]
    for _ in range(4):  # one count per visit, though two faults name the point
        faults.fault_point("train_step")
    assert stalls == [4.0, 1.0, None]


def test_a_fault_on_another_rank_does_nothing(monkeypatch, stalls):
    monkeypatch.setenv("LLMFORGE_FAULT", "train_step:stall=1")
    monkeypatch.setenv("LLMFORGE_FAULT_RANK", "1")
    monkeypatch.setenv("RANK", "0")
    faults.fault_point("train_step")
    assert stalls == []
