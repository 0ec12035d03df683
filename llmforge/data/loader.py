"""The token loader: a global sample order fixed by the data and the seed, sliced per rank.

Position p of the global sequence is a sample index by `data.order.GlobalOrder` (a seeded
permutation per epoch, on its own generator). A global batch is positions [p, p + global_batch_size); DP rank r takes the r-th equal
slice, and each worker process a fixed slice of that. The state is p alone, so a resume
with any worker count or data-parallel size continues the same global sequence.

With `packing: documents` a sample is one document (or piece), shorter than the window:
it is padded, and the batch carries loss masks that give padding no loss and no gradient.
Token counts (`last_batch_tokens`, the `max_tokens` budget) count real input tokens only,
read from the shard index without reading a sample.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import queue
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from llmforge.data.manifest import read_manifest
from llmforge.data.order import GlobalOrder
from llmforge.data.rows import RowGather
from llmforge.data.sft import MaskedBatch
from llmforge.data.shards import ShardReader, _npy_header, sample_key
from llmforge.spec.errors import UserError

if TYPE_CHECKING:
    import torch

STATE_VERSION = 1
PREFETCH_STEPS = 2
_LOGGED_SKIPS = 10


def _sample_lengths(shards: list[dict], dtype: str, width: int) -> np.ndarray:
    """Tokens per sample, from the byte sizes in the shard index (each is an .npy header + the ids)."""
    header = len(_npy_header(np.dtype(dtype).str, width))
    sizes = np.concatenate([np.asarray(r["sizes"], dtype=np.int64) for r in shards]) if shards else np.empty(0, np.int64)
    return (sizes - header) // np.dtype(dtype).itemsize


class _Fetch:
    """Reads samples by index into a [count, seq_length+1] block (padded with pad_id for document packing).

    `gather` (fixed-size samples): a whole batch in one read (`data.rows`); a batch it cannot
    read whole, and every padded one, is read one sample at a time.
    """

    def __init__(self, reader: ShardReader, width: int, pad_id: int, vocab_size: int | None, gather: RowGather | None = None) -> None:
        self.reader, self.width, self.pad_id, self.vocab_size, self.gather = reader, width, pad_id, vocab_size, gather

    def one(self, index: int) -> np.ndarray:
        tokens = self.reader.read(index)
        if tokens.size > self.width:
            raise ValueError(f"{self.reader.where(index)}: {tokens.size} tokens, longer than seq_length+1 = {self.width}")
        if self.vocab_size is not None and tokens.size and int(tokens.max()) >= self.vocab_size:
            raise ValueError(f"{self.reader.where(index)}: token id {int(tokens.max())} ≥ the model's vocab_size {self.vocab_size}")
        return tokens

    def block(self, indices: list[int]) -> tuple[np.ndarray, list[tuple[int, str]]]:
        """The samples, and (row, problem) for each that could not be read (its row is left as padding)."""
        if self.gather is not None:
            try:
                out = self.gather.rows(indices)
            except (ValueError, OSError):  # a damaged shard: read one by one below, which names it
                out = None
            if out is not None and (self.vocab_size is None or int(out.max()) < self.vocab_size):
                return out, []
        out = np.full((len(indices), self.width), self.pad_id, dtype=np.int64)
        bad = []
        for row, index in enumerate(indices):
            try:
                tokens = self.one(index)
            except (ValueError, OSError) as e:
                bad.append((row, str(e)))
                continue
            out[row, : tokens.size] = tokens
        return out, bad


def _worker_loop(fetch: _Fetch, tasks: mp.Queue, results: mp.Queue) -> None:
    while (task := tasks.get()) is not None:
        tag, indices = task
        results.put((tag, *fetch.block(indices)))


class TokenLoader:
    """Global batches of one split of `<run_dir>/data`, for one data-parallel rank.

    Args:
        on_error: `raise` on a corrupt shard or an out-of-vocab token, naming the shard and
            sample; `skip` replaces such a sample by the next readable one in index order
            (the same on every rank) and counts it in `skipped`.
        vocab_size: the model's vocabulary; token ids must stay below it.
        log: where a skipped sample is reported (the first few of them), naming its shard.
    """

    def __init__(self, data_dir: Path, split: str, *, global_batch_size: int, micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1,
                 seed: int = 0, shuffle: bool = True, num_workers: int = 0, on_error: str = "raise", vocab_size: int | None = None,
                 log: Callable[[str], None] | None = None) -> None:
        self.data_dir, self.split = Path(data_dir), split
        manifest = read_manifest(self.data_dir)
        info = manifest["splits"].get(split)
        if info is None or info["samples"] == 0:
            raise UserError(f"{self.data_dir}: the {split!r} split holds no samples", "prepare with a larger split.val_fraction, or more data")
        per_step = micro_batch_size * dp_size
        if global_batch_size % per_step:
            raise UserError(f"global_batch_size {global_batch_size} is not divisible by micro_batch_size {micro_batch_size} × dp_size {dp_size}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} is outside [0, {dp_size})")
        if vocab_size is not None and info["max_token_id"] >= vocab_size:
            raise UserError(f"{self.data_dir}: the {split} shards hold token id {info['max_token_id']}, but the model's vocab_size is {vocab_size}",
                            "raise model.vocab_size, or prepare the data with this model's tokenizer")
        self.global_batch_size, self.micro_batch_size = global_batch_size, micro_batch_size
        self.dp_rank, self.dp_size, self.seed, self.shuffle = dp_rank, dp_size, seed, shuffle
        self.on_error, self.num_workers, self.log = on_error, num_workers, log
        self.samples_per_epoch = info["samples"]
        self.tokens_per_sample = manifest["seq_length"]
        self.pad_id = manifest["tokenizer"]["pad_id"]
        self.data_id = f"{manifest['inputs_hash']}:{split}"
        reader = ShardReader(self.data_dir, info["shards"])
        self.padded = manifest.get("packing") == "documents"
        gather = None if self.padded else RowGather(reader, manifest["dtype"], self.tokens_per_sample + 1)
        self._fetch = _Fetch(reader, self.tokens_per_sample + 1, self.pad_id if self.pad_id is not None else 0, vocab_size, gather)
        self._lengths = _sample_lengths(info["shards"], manifest["dtype"], self.tokens_per_sample + 1) if self.padded else None
        # Non-pad input tokens of each sample (the inputs are a sample's tokens but its last).
        self._input_tokens = np.minimum(self._lengths, self.tokens_per_sample) if self.padded else None
        self.last_batch_tokens = 0  # real input tokens of the last global batch, over every DP rank
        self.position = 0
        self.skipped = 0
        self._last_indices: list[int] = []  # this rank's samples in the last batch
        self._order = GlobalOrder(self.samples_per_epoch, seed=seed, shuffle=shuffle)
        self._workers: list[tuple[mp.Process, mp.Queue, mp.Queue]] = []
        self._pending: deque[tuple[int, int]] = deque()  # (generation, position) of steps sent to the workers
        self._generation = 0

    # --- the global order ---------------------------------------------------------------

    @property
    def epoch(self) -> int:
        return self.position // self.samples_per_epoch

    def sample_indices(self, start: int, count: int) -> list[int]:
        """Sample indices at global positions [start, start + count)."""
        return self._order.indices(start, count)

    def _rank_indices(self, position: int) -> list[int]:
        per_rank = self.global_batch_size // self.dp_size
        return self.sample_indices(position + self.dp_rank * per_rank, per_rank)

    # --- reading ------------------------------------------------------------------------

    def _slices(self, count: int) -> list[slice]:
        workers = max(self.num_workers, 1)
        bounds = [count * w // workers for w in range(workers + 1)]
        return [slice(bounds[w], bounds[w + 1]) for w in range(workers)]

    def _start_workers(self) -> None:
        ctx = mp.get_context("fork")
        for _ in range(self.num_workers):
            tasks, results = ctx.Queue(), ctx.Queue()
            proc = ctx.Process(target=_worker_loop, args=(self._fetch, tasks, results), daemon=True)
            proc.start()
            self._workers.append((proc, tasks, results))

    def _submit(self, position: int) -> None:
        indices = self._rank_indices(position)
        for (_, tasks, _), part in zip(self._workers, self._slices(len(indices))):
            tasks.put(((self._generation, position), indices[part]))
        self._pending.append((self._generation, position))

    def _collect(self, position: int) -> tuple[np.ndarray, list[tuple[int, str]]]:
        tag = (self._generation, position)
        while self._pending and self._pending[0] != tag:
            self._drop_oldest()
        if not self._pending:
            self._submit(position)
        self._pending.popleft()
        blocks, bad, offset = [], [], 0
        for worker in self._workers:
            while True:
                got_tag, block, block_bad = self._result(worker)
                if got_tag == tag:
                    break
            blocks.append(block)
            bad += [(offset + row, problem) for row, problem in block_bad]
            offset += len(block)
        return np.concatenate(blocks), bad

    def _drop_oldest(self) -> None:
        tag = self._pending.popleft()
        for worker in self._workers:
            while self._result(worker)[0] != tag:
                pass

    @staticmethod
    def _result(worker: tuple[mp.Process, mp.Queue, mp.Queue]) -> tuple:
        proc, _, results = worker
        while True:
            try:
                return results.get(timeout=5)
            except queue.Empty:
                # A worker killed (e.g. by the OOM killer) would otherwise hang training forever.
                if not proc.is_alive():
                    raise RuntimeError(f"data loader worker (pid {proc.pid}) died with exit code {proc.exitcode}") from None

    def _read(self, position: int) -> tuple[np.ndarray, list[int]]:
        """This rank's samples at `position`, and their sample indices (after any replacement)."""
        indices = self._rank_indices(position)
        if self.num_workers == 0:
            block, bad = self._fetch.block(indices)
        else:
            if not self._workers:
                self._start_workers()
            block, bad = self._collect(position)
            # Keep the workers busy on the next steps while this one trains.
            ahead = {p for _, p in self._pending}
            for step in range(1, PREFETCH_STEPS + 1):
                if position + step * self.global_batch_size not in ahead:
                    self._submit(position + step * self.global_batch_size)
        for row, problem in bad:
            indices[row], block[row] = self._replacement(indices[row], problem)
        return block, indices

    def _replacement(self, index: int, problem: str) -> tuple[int, np.ndarray]:
        if self.on_error != "skip":
            raise UserError(problem, "prepare the data again (it rebuilds damaged shards), or set data.on_error: skip")
        self.skipped += 1
        row = np.full(self._fetch.width, self._fetch.pad_id, dtype=np.int64)
        for k in range(1, self.samples_per_epoch):
            other = (index + k) % self.samples_per_epoch
            try:
                tokens = self._fetch.one(other)
            except (ValueError, OSError):
                continue
            row[: tokens.size] = tokens
            # A bad shard costs one line per sample read from it; beyond a few, they are only counted.
            if self.log is not None and self.skipped <= _LOGGED_SKIPS:
                more = " (further skips are only counted)" if self.skipped == _LOGGED_SKIPS else ""
                self.log(f"warning: skipped {problem}; read sample {other} in its place ({self.skipped} skipped){more}")
            return other, row
        raise UserError(f"{self.data_dir}: no readable sample in the {self.split} split", "prepare the data again")

    def next_global_batch(self) -> list[torch.LongTensor] | MaskedBatch:
        """This rank's micro batches for one optimizer step: global/(micro × dp) tensors of [micro, seq_length+1].

        With padded samples (`packing: documents`), a MaskedBatch whose masks [micro,
        seq_length] are 1 on the targets of real tokens and 0 on padding.
        """
        import torch

        if self.padded:
            self.last_batch_tokens = int(self._input_tokens[self.sample_indices(self.position, self.global_batch_size)].sum())
        else:
            self.last_batch_tokens = self.global_batch_size * self.tokens_per_sample
        block, indices = self._read(self.position)
        self.position += self.global_batch_size
        self._last_indices = indices
        micro_batches = len(block) // self.micro_batch_size
        tokens = [torch.from_numpy(block)] if micro_batches == 1 else [torch.from_numpy(m) for m in np.split(block, micro_batches)]
        if not self.padded:
            return tokens
        # Target j (token j+1) is real when token j+1 is: a sample of L tokens has L-1 targets.
        lengths = torch.from_numpy(self._lengths[indices])
        masks = (torch.arange(self.tokens_per_sample).unsqueeze(0) < (lengths - 1).unsqueeze(1)).float()
        return MaskedBatch(tokens, list(masks.split(self.micro_batch_size)))

    @property
    def last_keys(self) -> list[str]:
        """The `__key__`s of this rank's samples in the last batch."""
        return [sample_key(i) for i in self._last_indices]

    # --- budgets and state --------------------------------------------------------------

    def steps_for_tokens(self, max_tokens: int) -> int:
        """Optimizer steps until `max_tokens` real input tokens have been read, along the loader's own order."""
        if not self.padded:
            return math.ceil(max_tokens / (self.global_batch_size * self.tokens_per_sample))
        return self._order.steps_for_tokens(self._input_tokens, global_batch_size=self.global_batch_size, max_tokens=max_tokens)

    def state_dict(self) -> dict:
        """The same on every rank: the global position and what it is a position in."""
        return {"version": STATE_VERSION, "position": self.position, "seed": self.seed, "shuffle": self.shuffle,
                "split": self.split, "samples_per_epoch": self.samples_per_epoch, "data_id": self.data_id}

    def load_state_dict(self, sd: dict) -> None:
        if sd.get("version") != STATE_VERSION:
            raise UserError(f"unknown data loader state version {sd.get('version')!r}", f"this llmforge reads version {STATE_VERSION}")
        mine = self.state_dict()
        for key in ("split", "seed", "shuffle", "samples_per_epoch", "data_id"):
            if sd.get(key) != mine[key]:
                raise UserError(f"the data loader state is for other data: {key} {sd.get(key)!r} ≠ {mine[key]!r}",
                                "resume with the data and seed the checkpoint was trained on, or start the stage afresh")
        self.position = int(sd["position"])
        self._generation += 1  # prefetched batches belong to the old position
        self._pending.clear()

    def close(self) -> None:
        for proc, tasks, _ in self._workers:
            if proc.is_alive():
                tasks.put(None)
        for proc, _, _ in self._workers:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.terminate()
        self._workers.clear()
        self._pending.clear()
        if self._fetch.gather is not None:
            self._fetch.gather.close()
        self._fetch.reader.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: the daemon workers die with us anyway
            pass
