"""Synthetic task data with a measurable right answer, generated deterministically from a seed.

Finetune stages, examples and tests get instruction data (and preference pairs) without
any file from outside: 2- and 3-digit addition and string reversal. Torch-free.
"""

from __future__ import annotations

import random
import string
import zlib
from collections.abc import Iterator

TASKS = ("add2", "add3", "reverse")
SPLITS = ("train", "heldout", "all")
# One problem in ten is held out, chosen by a hash of the problem itself (not of the seed), so
# "heldout" sets share no problem with "train" sets whatever seeds and sizes two specs pick:
# with 8,100 possible 2-digit sums, seeds alone would repeat most problems across sets.
HELDOUT_PERCENT = 10


def is_heldout(task: str, prompt: str) -> bool:
    return zlib.crc32(f"{task}:{prompt}".encode()) % 100 < HELDOUT_PERCENT


def _example(task: str, rng: random.Random) -> tuple[str, str, str]:
    """(prompt, right answer, a plausible wrong answer)."""
    if task in ("add2", "add3"):
        lo, hi = (10, 99) if task == "add2" else (100, 999)
        a, b = rng.randint(lo, hi), rng.randint(lo, hi)
        right = a + b
        wrong = right + rng.choice([-1, 1]) * rng.choice([1, 2, 10, 100])
        return f"{a}+{b}=", str(right), str(wrong)
    if task == "reverse":
        word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 7)))
        right = word[::-1]
        wrong = word if rng.random() < 0.5 else right[1:] + right[0]
        if wrong == right:  # a palindrome: any change is wrong
            wrong = right + right[-1]
        return f"reverse {word}:", right, wrong
    raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")


def generate(tasks: list[str], n: int, seed: int, split: str = "all") -> Iterator[tuple[str, str, str, str]]:
    """n examples cycling through `tasks`: (task, prompt, right, wrong). Same seed, same data.

    `split` keeps only problems on one side of the fixed train/heldout partition (`is_heldout`).
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    rng = random.Random(f"llmforge-tasks:{seed}")
    for i in range(n):
        task = tasks[i % len(tasks)]
        while True:
            example = _example(task, rng)
            if split == "all" or is_heldout(task, example[0]) == (split == "heldout"):
                break
        yield (task, *example)


def instructions(tasks: list[str], n: int, seed: int, split: str = "all") -> list[dict[str, str]]:
    return [{"prompt": p, "response": r, "task": t} for t, p, r, _ in generate(tasks, n, seed, split)]


def preferences(tasks: list[str], n: int, seed: int, split: str = "all") -> list[dict[str, str]]:
    return [{"prompt": p, "chosen": r, "rejected": w, "task": t} for t, p, r, w in generate(tasks, n, seed, split)]


def task_source(options, *, context) -> Iterator:
    """The `tasks` data source: synthetic examples as finetune records or text documents."""
    from llmforge.data.sources import Document

    for i, (task, prompt, right, wrong) in enumerate(generate(options.tasks, options.num_examples, options.seed, options.split)):
        where = f"tasks:{options.seed}:{i}"
        if options.format == "instructions":
            yield Document({"prompt": prompt, "response": right}, where)
        elif options.format == "preferences":
            yield Document({"prompt": prompt, "chosen": right, "rejected": wrong}, where)
        else:
            yield Document(f"{prompt}{right}", where)
