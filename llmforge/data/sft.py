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
from typing import Any, NamedTuple, Protocol

import numpy as np

from llmforge.data.order import GlobalOrder
from llmforge.spec.errors import UserError
from llmforge.spec.stages import TOKENIZER_TEMPLATE  # the tokenizer's own Jinja template (llmforge.data.chat_template)

# Built-in templates: (text before the prompt, between prompt and response, after the response).
TEMPLATES = {
    "default": ("<|user|>", "<|assistant|>", ""),
    "plain": ("", "", ""),
}
# A system turn ahead of the first prompt: the default template's role token, else the text and a blank line.
SYSTEM_TURNS = {"default": "<|system|>{system}"}
PLAIN_SYSTEM_TURN = "{system}\n\n"
SFT_STATE_VERSION = 2  # 2: the input files' identity (`data_files`)
DataFiles = dict[str, dict[str, str]]  # source name → input file → sha256 of the records it yielded


class ChatFormat(Protocol):
    """How a stage turns records into tokens: every example, evaluator prompt and rollout prompt goes through one."""

    def encode(self, record: dict[str, Any]) -> tuple[list[int], list[int]]:
        """(token ids, loss mask per id) of a prompt/response or `messages` record."""

    def prompt_ids(self, prompt: str, system: str | None = None) -> list[int]:
        """A prompt as the template renders it, up to where the response starts: what generation continues."""


def chat_format(template: str, tokenizer, *, train_on_turns: str = "all") -> ChatFormat:
    """The stage's `chat_template` over the run's tokenizer: `tokenizer`, a built-in name, or a {prompt}/{response} string."""
    if template == TOKENIZER_TEMPLATE:
        from llmforge.data.chat_template import TokenizerTemplate

        return TokenizerTemplate(tokenizer, train_on_turns=train_on_turns)
    return PromptResponseTemplate(tokenizer, template, train_on_turns=train_on_turns)


def template_parts(template: str) -> tuple[str, str, str]:
    if template in TEMPLATES:
        return TEMPLATES[template]
    if "{prompt}" not in template or "{response}" not in template:
        raise UserError(f"chat_template {template!r} is neither a built-in ({', '.join(TEMPLATES)}), `{TOKENIZER_TEMPLATE}`, "
                        "nor a string with {prompt} and {response}",
                        "write e.g. '### Question: {prompt}\\n### Answer: {response}'")
    head, rest = template.split("{prompt}", 1)
    middle, tail = rest.split("{response}", 1)
    return head, middle, tail


class PromptResponseTemplate:
    """A `{prompt}/{response}` template (the built-ins too): head + prompt + middle, then response + tail + EOS.

    A `messages` record renders each user/assistant pair so, in order, after its optional first
    system turn (`SYSTEM_TURNS`); each assistant reply ends with EOS, and trains with it.
    """

    def __init__(self, tokenizer, template: str, *, train_on_turns: str = "all") -> None:
        self.tokenizer, self.train_on_turns = tokenizer, train_on_turns
        self.head, self.middle, self.tail = template_parts(template)
        self.system_turn = SYSTEM_TURNS.get(template, PLAIN_SYSTEM_TURN)

    def _system(self, system: str | None) -> str:
        return "" if system is None else self.system_turn.replace("{system}", system)

    def encode(self, record: dict[str, Any]) -> tuple[list[int], list[int]]:
        """(token ids, loss mask): the loss covers each trained response, its tail and the EOS closing it."""
        tok = self.tokenizer
        if "messages" in record:
            system, pairs = _turn_pairs(record["messages"])
        else:
            system, pairs = record.get("system"), [(record["prompt"], record["response"])]
        ids = tok.start()  # BOS by the one rule (HFTokenizer.add_bos)
        mask = [0] * len(ids)
        for k, (prompt, response) in enumerate(pairs):
            prefix = tok.encode(f"{self._system(system) if k == 0 else ''}{self.head}{prompt}{self.middle}")
            answer = tok.encode(f"{response}{self.tail}") + [tok.eos_id]
            trains = int(self.train_on_turns == "all" or k == len(pairs) - 1)
            ids, mask = ids + prefix + answer, mask + [0] * len(prefix) + [trains] * len(answer)
        return ids, mask

    def prompt_ids(self, prompt: str, system: str | None = None) -> list[int]:
        return self.tokenizer.start() + self.tokenizer.encode(f"{self._system(system)}{self.head}{prompt}{self.middle}")


def _turn_pairs(messages: list[dict[str, Any]]) -> tuple[str | None, list[tuple[str, str]]]:
    """(system text or None, [(user, assistant), ...]) of a conversation a {prompt}/{response} template can render."""
    system = messages[0]["content"] if messages and messages[0]["role"] == "system" else None
    rest = messages[1:] if system is not None else messages
    expected = ["user", "assistant"] * (len(rest) // 2)
    if not rest or [m["role"] for m in rest] != expected:
        roles = ", ".join(m["role"] for m in messages)
        raise UserError(f"a `messages` record with turns ({roles}) does not fit a {{prompt}}/{{response}} chat template, which takes "
                        "an optional first system turn, then user and assistant turns in turn, ending with the assistant's",
                        "fix the record (its first words: " + repr(messages[0]["content"][:40]) + "), or use chat_template: tokenizer "
                        "with a tokenizer whose template accepts such conversations")
    return system, [(rest[k]["content"], rest[k + 1]["content"]) for k in range(0, len(rest), 2)]


def marked_text(tokenizer, ids: list[int], mask: list[int], *, open_: str = "[[", close: str = "]]") -> str:
    """The text of `ids` with each run of trained tokens between `open_` and `close`: what a preflight log shows."""
    out, k = [], 0
    while k < len(ids):
        j = k
        while j < len(ids) and mask[j] == mask[k]:
            j += 1
        text = tokenizer.decode(ids[k:j])
        out.append(f"{open_}{text}{close}" if mask[k] else text)
        k = j
    return "".join(out)


@dataclass
class MaskedBatch:
    """One optimizer step's micro batches with their loss masks (what TrainStep takes)."""

    tokens: list[Any]  # LongTensor [micro, length + 1]
    masks: list[Any]  # FloatTensor [micro, length]
    segments: list[Any] | None = None  # LongTensor [micro, length]: example index per input token of packed rows


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


class PackedDocuments(NamedTuple):
    """Several examples per row (`packing: true`), with each input token's example index in its row."""

    tokens: np.ndarray  # [rows, width] token ids, padded at the end
    masks: np.ndarray  # [rows, width - 1] each example's own loss mask on the targets; 0 across a boundary and on padding
    truncated: int  # examples cut to fit one row
    input_tokens: np.ndarray  # [rows] real input tokens the model reads of each row
    segments: np.ndarray  # [rows, width - 1] example index of each input token (padding: one past the row's last example)


def pack_documents(encoded: list[tuple[list[int], list[int]]], length: int, pad_id: int) -> PackedDocuments:
    """Examples laid end to end in rows of length+1 tokens, in order: one starts a new row when it does not fit.

    Greedy and order-keeping (TRL's `packing_strategy: wrapped` without cutting examples): the
    rows are the loader's samples, so their order is the seed's as without packing.
    """
    rows: list[list[tuple[list[int], list[int]]]] = [[]]
    used, truncated = 0, 0
    for ids, mask in encoded:
        if len(ids) > length + 1:
            truncated += 1
            ids, mask = ids[: length + 1], mask[: length + 1]
        if used + len(ids) > length + 1:
            rows.append([])
            used = 0
        rows[-1].append((ids, mask))
        used += len(ids)
    tokens = np.full((len(rows), length + 1), pad_id, dtype=np.int64)
    masks = np.zeros((len(rows), length), dtype=np.float32)
    segments = np.zeros((len(rows), length), dtype=np.int64)
    inputs = np.zeros(len(rows), dtype=np.int64)
    for r, row in enumerate(rows):
        at = 0
        for k, (ids, mask) in enumerate(row):
            tokens[r, at:at + len(ids)] = ids
            # Target j is token j + 1: an example's first token is never a target of the one before.
            masks[r, at:at + len(ids) - 1] = mask[1:]
            segments[r, at:min(at + len(ids), length)] = k
            at += len(ids)
        segments[r, min(at, length):] = len(row)
        inputs[r] = min(at, length)
    return PackedDocuments(tokens, masks, truncated, inputs, segments)


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
                 input_tokens: np.ndarray | None = None, segments: np.ndarray | None = None):
        if len(tokens) == 0:
            raise UserError("the finetune set is empty", "check the stage's data sources and filters")
        if global_batch_size % (micro_batch_size * dp_size):
            raise UserError(f"global_batch_size {global_batch_size} is not divisible by micro {micro_batch_size} × dp {dp_size}")
        self.tokens, self.masks, self.segments = tokens, masks, segments
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
        segments = None if self.segments is None else list(torch.from_numpy(self.segments[rows]).chunk(n))
        return MaskedBatch(list(tok.chunk(n)), list(mask.chunk(n)), segments)

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
