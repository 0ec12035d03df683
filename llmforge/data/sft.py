"""Finetune data: chat templates, response-only loss masks, and a resumable in-memory loader.

Finetune sets are small next to pretraining corpora, so they are tokenized at stage start
and kept in memory. The order follows the same rules as the pretraining loader: a seeded
permutation per epoch over the global example index, each DP rank a fixed slice of every
global batch, and a state that is the global position and the identity of every input file
(the data a resume must find unchanged).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from llmforge.data.order import GlobalOrder
from llmforge.spec.errors import UserError

# Built-in templates: (text before the prompt, between prompt and response, after the response).
TEMPLATES = {
    "default": ("<|user|>", "<|assistant|>", ""),
    "plain": ("", "", ""),
}
SFT_STATE_VERSION = 2  # 2: the input files' identity (`data_files`)
DataFiles = dict[str, dict[str, str]]  # source name → input file → sha256 of the records it yielded


def template_parts(template: str) -> tuple[str, str, str]:
    if template in TEMPLATES:
        return TEMPLATES[template]
    if "{prompt}" not in template or "{response}" not in template:
        raise UserError(f"chat_template {template!r} is neither a built-in ({', '.join(TEMPLATES)}) nor a string with {{prompt}} and {{response}}",
                        "write e.g. '### Question: {prompt}\\n### Answer: {response}'")
    head, rest = template.split("{prompt}", 1)
    middle, tail = rest.split("{response}", 1)
    return head, middle, tail


def _messages_to_turns(record: dict[str, Any]) -> tuple[str, str]:
    """Chat messages → (prompt text with all turns before the last assistant turn, last reply)."""
    messages = record["messages"]
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    context = "".join(f"<|{m['role']}|>{m['content']}" for m in messages[:last])
    return context, messages[last]["content"]


def encode_example(tokenizer, parts: tuple[str, str, str], record: dict[str, Any]) -> tuple[list[int], list[int]]:
    """(token ids, loss mask per id): the loss covers the response and the closing EOS only."""
    head, middle, tail = parts
    if "messages" in record:
        prompt, response = _messages_to_turns(record)
        prompt_text = f"{prompt}<|assistant|>"
    else:
        prompt, response = record["prompt"], record["response"]
        prompt_text = f"{head}{prompt}{middle}"
    prefix = tokenizer.start() + tokenizer.encode(prompt_text)  # BOS by the one rule (HFTokenizer.add_bos)
    answer = tokenizer.encode(f"{response}{tail}") + [tokenizer.eos_id]
    return prefix + answer, [0] * len(prefix) + [1] * len(answer)


def prompt_ids(tokenizer, parts: tuple[str, str, str], prompt: str) -> list[int]:
    """A prompt as the template renders it, up to where the response starts: what generation continues."""
    ids, mask = encode_example(tokenizer, parts, {"prompt": prompt, "response": ""})
    return ids[: mask.index(1)]


@dataclass
class MaskedBatch:
    """One optimizer step's micro batches with their loss masks (what TrainStep takes)."""

    tokens: list[Any]  # LongTensor [micro, length + 1]
    masks: list[Any]  # FloatTensor [micro, length]


class Packed(NamedTuple):
    """Examples padded into rows, with what the loader counts of each row."""

    tokens: np.ndarray  # [n, width] token ids, padded
    masks: np.ndarray  # [n, width - 1] loss masks on the targets
    truncated: int  # examples cut to fit
    input_tokens: np.ndarray  # [n] real (non-pad) input tokens the model reads of each row, from the true lengths


def pack_examples(encoded: list[tuple[list[int], list[int]]], length: int, pad_id: int) -> Packed:
    """Pad each example to length+1 tokens; masks align with the *targets* (ids[1:]).

    The model reads the first `length` tokens of a row: an example's real input tokens are
    min(its length, `length`), counted from the example itself, since the pad id may be EOS.
    """
    tokens = np.full((len(encoded), length + 1), pad_id, dtype=np.int64)
    masks = np.zeros((len(encoded), length), dtype=np.float32)
    inputs = np.zeros(len(encoded), dtype=np.int64)
    truncated = 0
    for i, (ids, mask) in enumerate(encoded):
        if len(ids) > length + 1:
            truncated += 1
            ids, mask = ids[: length + 1], mask[: length + 1]
        tokens[i, : len(ids)] = ids
        masks[i, : len(ids) - 1] = mask[1:]
        inputs[i] = min(len(ids), length)
    return Packed(tokens, masks, truncated, inputs)


class RecordDigests:
    """sha256 of the records each input file yielded, in order: the data identity a resume checks.

    Records rather than bytes: a blank line or reformatted JSON leaves every example, and so the
    resume, as it was; an edited, added, removed or reordered record shows.
    """

    def __init__(self) -> None:
        self._hashes: dict[str, Any] = {}

    def tap(self, docs: Iterable[Any]) -> Iterator[Any]:
        """The documents, unchanged, hashed on the way by the file of their `file:line` origin."""
        for doc in docs:
            file, sep, line = doc.origin.rpartition(":")
            digest = self._hashes.setdefault(file if sep and line.isdigit() else doc.origin, hashlib.sha256())
            digest.update(json.dumps(doc.content, sort_keys=True, ensure_ascii=False).encode() + b"\n")
            yield doc

    def hexdigests(self) -> dict[str, str]:
        return {file: digest.hexdigest() for file, digest in self._hashes.items()}


def check_data_files(saved: DataFiles | None, current: DataFiles) -> None:
    """Refuse to resume on other data than the checkpoint's, naming the files that changed, appeared or went."""
    if saved is None:  # a version-1 state, written before the files were recorded
        return
    old = {(src, file): d for src, files in saved.items() for file, d in files.items()}
    new = {(src, file): d for src, files in current.items() for file, d in files.items()}
    changes = [f"{file} changed (source {src!r})" for (src, file), d in new.items() if (src, file) in old and old[src, file] != d]
    changes += [f"{file} is new (source {src!r})" for src, file in new if (src, file) not in old]
    changes += [f"{file} is gone or yields no records (source {src!r})" for src, file in old if (src, file) not in new]
    if changes:
        more = f", and {len(changes) - 3} more" if len(changes) > 3 else ""
        raise UserError(f"the stage's data changed since its checkpoint: {', '.join(changes[:3])}{more}",
                        "restore the file, or start the stage afresh in a new run dir")


class SFTLoader:
    """In-memory finetune batches with the pretraining loader's ordering and state rules.

    With `input_tokens` (each row's real input tokens, `Packed.input_tokens`) it counts what
    the pretraining loader counts: `last_batch_tokens`, the real input tokens of the last
    global batch over every DP rank, and a `max_tokens` budget along its own order.
    """

    def __init__(self, tokens: np.ndarray, masks: np.ndarray, *, global_batch_size: int, micro_batch_size: int,
                 dp_rank: int = 0, dp_size: int = 1, seed: int = 0, shuffle: bool = True, data_files: DataFiles | None = None,
                 input_tokens: np.ndarray | None = None):
        if len(tokens) == 0:
            raise UserError("the finetune set is empty", "check the stage's data sources and filters")
        if global_batch_size % (micro_batch_size * dp_size):
            raise UserError(f"global_batch_size {global_batch_size} is not divisible by micro {micro_batch_size} × dp {dp_size}")
        self.tokens, self.masks = tokens, masks
        self.global_batch_size, self.micro_batch_size = global_batch_size, micro_batch_size
        self.dp_rank, self.dp_size, self.seed, self.shuffle = dp_rank, dp_size, seed, shuffle
        self.data_files = data_files or {}
        self.position = 0
        self.samples_per_epoch = len(tokens)
        self.tokens_per_sample = tokens.shape[1] - 1
        self.input_tokens = input_tokens
        self.last_batch_tokens = 0  # real input tokens of the last global batch, over every DP rank (0: not counted)
        self._order = GlobalOrder(len(tokens), seed=seed, shuffle=shuffle, salt=0x5F7)

    @property
    def epoch(self) -> int:
        return self.position // self.samples_per_epoch

    def next_global_batch(self) -> MaskedBatch:
        import torch

        per_rank = self.global_batch_size // self.dp_size
        start = self.position + self.dp_rank * per_rank
        rows = [self._order.index(p) for p in range(start, start + per_rank)]
        if self.input_tokens is not None:
            every_rank = [self._order.index(p) for p in range(self.position, self.position + self.global_batch_size)]
            self.last_batch_tokens = int(self.input_tokens[every_rank].sum())
        self.position += self.global_batch_size
        tok = torch.from_numpy(self.tokens[rows])
        mask = torch.from_numpy(self.masks[rows])
        n = per_rank // self.micro_batch_size
        return MaskedBatch(list(tok.chunk(n)), list(mask.chunk(n)))

    def steps_for_tokens(self, max_tokens: int) -> int:
        """Optimizer steps until `max_tokens` real input tokens have been read, along the loader's own order."""
        if self.input_tokens is None:
            return -(-max_tokens // (self.global_batch_size * self.tokens_per_sample))
        return self._order.steps_for_tokens(self.input_tokens, global_batch_size=self.global_batch_size, max_tokens=max_tokens)

    def state_dict(self) -> dict[str, Any]:
        return {"version": SFT_STATE_VERSION, "position": self.position, "seed": self.seed, "data_files": self.data_files}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") not in (1, SFT_STATE_VERSION):
            raise UserError(f"finetune loader state version {state.get('version')} is not {SFT_STATE_VERSION}")
        check_data_files(state.get("data_files"), self.data_files)
        self.position = int(state["position"])
