"""The synthetic task generator: right answers, determinism, and a train/heldout split that never overlaps."""

from __future__ import annotations

import pytest

from llmforge.data import tasks
from llmforge.spec.components import ExactMatch, TaskSource


def test_answers_are_right_and_wrong_answers_are_wrong():
    for task, prompt, right, wrong in tasks.generate(["add2", "add3", "reverse"], 600, seed=3):
        assert right != wrong
        if task == "reverse":
            word = prompt.removeprefix("reverse ").removesuffix(":")
            assert right == word[::-1]
        else:
            a, b = prompt.removesuffix("=").split("+")
            assert int(right) == int(a) + int(b)
            assert len(a) == len(b) == (2 if task == "add2" else 3)


def test_same_seed_same_data_other_seed_other_data():
    assert list(tasks.generate(["add2"], 50, 7, "train")) == list(tasks.generate(["add2"], 50, 7, "train"))
    assert list(tasks.generate(["add2"], 50, 7)) != list(tasks.generate(["add2"], 50, 8))


@pytest.mark.parametrize("task", tasks.TASKS)
def test_heldout_problems_never_appear_in_train_sets(task):
    train = {p for _, p, _, _ in tasks.generate([task], 20000, seed=1, split="train")}
    heldout = {p for _, p, _, _ in tasks.generate([task], 500, seed=99, split="heldout")}
    assert train and heldout and not train & heldout
    # The partition holds ~1/10 of all problems whatever the seed.
    everything = [p for _, p, _, _ in tasks.generate([task], 5000, seed=5, split="all")]
    share = sum(tasks.is_heldout(task, p) for p in everything) / len(everything)
    assert 0.07 < share < 0.13


def test_defaults_train_on_train_and_evaluate_on_heldout():
    assert TaskSource().split == "train"
    assert ExactMatch(tasks={"tasks": ["add2"]}).tasks.split == "heldout"
    with pytest.raises(ValueError, match="unknown split"):
        list(tasks.generate(["add2"], 1, 0, "test"))


def test_source_formats():
    opts = TaskSource(tasks=["add2"], num_examples=3, seed=0, format="preferences")
    docs = list(tasks.task_source(opts, context=None))
    assert [sorted(d.content) for d in docs] == [["chosen", "prompt", "rejected"]] * 3
    text = list(tasks.task_source(opts.model_copy(update={"format": "text"}), context=None))
    assert all("=" in d.content and "\n" not in d.content for d in text)
