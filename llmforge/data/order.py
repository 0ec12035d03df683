"""The global sample order every loader shares: position p → sample index, epoch by epoch.

Position p is sample `perm_e[p % n]` of epoch e = p // n, where `perm_e` is a permutation
drawn from a generator of its own, seeded by (seed, e[, salt]): never the global RNG, which
dropout and the TP ranks share, so ranks that draw differently still agree. A loader's state
is then its position alone, and a resume at any DP size continues the same sequence.
"""

from __future__ import annotations

import itertools

import numpy as np


class GlobalOrder:
    """The order of `size` samples over positions 0, 1, 2, ... (seeded permutations, or the identity).

    Args:
        salt: told apart orders that share a seed (finetune examples, RL prompts); None for the
            pretraining loader, whose permutations are seeded by (seed, epoch) alone.
    """

    def __init__(self, size: int, *, seed: int, shuffle: bool = True, salt: int | None = None) -> None:
        self.size, self.seed, self.shuffle, self.salt = size, seed, shuffle, salt
        self._cached: dict[int, np.ndarray] = {}

    def epoch(self, epoch: int) -> np.ndarray:
        """The sample indices of one epoch, in order."""
        if not self.shuffle:
            return np.arange(self.size)
        perm = self._cached.get(epoch)
        if perm is None:
            key = [self.seed, epoch] if self.salt is None else [self.seed, epoch, self.salt]
            perm = np.random.default_rng(key).permutation(self.size)
            # Keep this epoch and the one before: a global batch may straddle the boundary.
            self._cached = {epoch - 1: self._cached[epoch - 1]} if epoch - 1 in self._cached else {}
            self._cached[epoch] = perm
        return perm

    def index(self, position: int) -> int:
        epoch, offset = divmod(position, self.size)
        if not self.shuffle:  # the val loaders: no array to build per sample
            return offset
        return int(self.epoch(epoch)[offset])

    def indices(self, start: int, count: int) -> list[int]:
        """Sample indices at positions [start, start + count): a slice of each epoch's order it spans."""
        out: list[int] = []
        position, end = start, start + count
        while position < end:
            epoch, offset = divmod(position, self.size)
            take = min(self.size - offset, end - position)
            out += range(offset, offset + take) if not self.shuffle else self.epoch(epoch)[offset:offset + take].tolist()
            position += take
        return out

    def steps_for_tokens(self, tokens_per_sample: np.ndarray, *, global_batch_size: int, max_tokens: int) -> int:
        """Global batches, read in this order, until `max_tokens` of the samples' tokens have been read."""
        seen = 0
        for epoch in itertools.count():
            cumulative = seen + np.cumsum(tokens_per_sample[self.epoch(epoch)])
            if cumulative[-1] >= max_tokens:
                position = epoch * self.size + int(np.searchsorted(cumulative, max_tokens))
                return position // global_batch_size + 1
            seen = int(cumulative[-1])
        raise AssertionError("unreachable")
