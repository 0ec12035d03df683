"""Write this folder's task data from llmforge's synthetic tasks (`llmforge.data.tasks`): 2-digit sums.

    python examples/eval_tasks/make_data.py

`data/add2_test.jsonl` holds held-out problems (never in a `split: train` set of any seed), and
`data/add2_train.jsonl` training-side ones for few-shot examples. Each record has the prompt
(`23+58=`), the answer, and two choices (the answer and the task's plausible wrong sum) in an
order fixed by a hash of the prompt, with `label` the answer's index. A test checks the files are
what this script writes.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

from llmforge.data.tasks import generate

HERE = Path(__file__).resolve().parent
FILES = {"add2_test.jsonl": ("heldout", 200, 7), "add2_train.jsonl": ("train", 20, 8)}  # name: (split, documents, seed)


def records(split: str, count: int, seed: int) -> list[dict]:
    out = []
    for _, prompt, right, wrong in generate(["add2"], count, seed, split):
        label = zlib.crc32(prompt.encode()) % 2
        choices = [right, wrong] if label == 0 else [wrong, right]
        out.append({"prompt": prompt, "answer": right, "choices": choices, "label": label})
    return out


def texts() -> dict[str, str]:
    """Each data file's content, by name."""
    return {name: "".join(json.dumps(r) + "\n" for r in records(*how)) for name, how in FILES.items()}


if __name__ == "__main__":
    for name, text in texts().items():
        (HERE / "data" / name).write_text(text)
        print(f"wrote {HERE / 'data' / name}")
