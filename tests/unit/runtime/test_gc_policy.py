"""The collector is off during a run's set-up, and off what the set-up built during the loop (runtime.gc_policy)."""

from __future__ import annotations

import gc

import pytest

from llmforge.runtime import gc_policy


@pytest.fixture(autouse=True)
def restore():
    enabled = gc.isenabled()
    yield
    gc.unfreeze()
    gc_policy._state["quiet"] = False
    (gc.enable if enabled else gc.disable)()


def test_a_training_stage_sets_up_quietly_and_its_loop_collects_only_new_objects():
    gc_policy.quiet()  # `llmforge run` starting
    assert not gc.isenabled()
    imported = [[] for _ in range(1000)]  # what the quiet start-up made (imports)
    gc_policy.stage_starting("prepare")
    assert gc.isenabled()  # prepare collects as usual...
    assert gc.get_freeze_count() >= len(imported) and gc.get_count()[0] < len(imported)  # ...but not over the start-up's objects
    gc_policy.stage_starting("pretrain")
    assert not gc.isenabled()
    setup = [[] for _ in range(1000)]  # what the stage builds
    with gc_policy.frozen_setup():
        assert gc.isenabled() and gc.get_freeze_count() >= len(setup)
    assert gc.get_freeze_count() == 0  # back in reach for later collections


def test_a_loop_in_a_process_that_never_went_quiet_leaves_collection_as_it_was():
    gc.disable()
    with gc_policy.frozen_setup():
        assert not gc.isenabled()  # the user's choice, not ours
    gc.enable()
    with gc_policy.frozen_setup():
        assert gc.isenabled()
    assert gc.isenabled() and gc.get_freeze_count() == 0


def test_cycles_made_during_the_loop_are_still_collected():
    class Node:
        pass

    with gc_policy.frozen_setup():
        a, b = Node(), Node()
        a.other, b.other = b, a
        del a, b
        assert gc.collect() >= 2
