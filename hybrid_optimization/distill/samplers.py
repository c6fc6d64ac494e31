"""Batch samplers with checkpointable state.

The baseline draws uniformly shuffled batches (`ShuffleBatchSampler`); the hybrid run draws cluster-balanced
batches (the core's `ClusterBalancedSampler`). Both are endless streams of full batches of sample indices, seeded
and resumable from `state_dict()`, so an interrupted run continues with exactly the batches it would have drawn.
"""
from __future__ import annotations

import numpy as np


class ShuffleBatchSampler:
    """Endless full batches from successive random permutations of range(n) (a batch may span two passes)."""

    def __init__(self, n: int, batch_size: int, seed: int = 0):
        if n < 1:
            raise ValueError("ShuffleBatchSampler needs at least one sample")
        self.n, self.batch_size = int(n), int(batch_size)
        self.rng = np.random.default_rng(seed)
        self.perm = self.rng.permutation(self.n)
        self.pos = 0
        self.epoch = 0
        self.last_cluster = None

    def __len__(self) -> int:
        return max(1, -(-self.n // self.batch_size))

    def __iter__(self):
        return self

    def __next__(self) -> np.ndarray:
        return self.next_batch()

    def next_batch(self) -> np.ndarray:
        parts, need = [], self.batch_size
        while need > 0:
            if self.pos >= self.n:
                self.perm = self.rng.permutation(self.n)
                self.pos = 0
                self.epoch += 1
            chunk = self.perm[self.pos:self.pos + need]
            self.pos += len(chunk)
            need -= len(chunk)
            parts.append(chunk)
        return np.concatenate(parts)

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state, "perm": self.perm.tolist(), "pos": self.pos, "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        if len(state["perm"]) != self.n:
            raise ValueError(f"sampler state is for {len(state['perm'])} samples, this data has {self.n}")
        self.rng.bit_generator.state = state["rng"]
        self.perm = np.asarray(state["perm"], dtype=np.int64)
        self.pos = int(state["pos"])
        self.epoch = int(state["epoch"])
