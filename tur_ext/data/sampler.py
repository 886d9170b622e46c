"""The task-balanced batch sampler (every task in every batch, as the TUR loss wants) and per-worker seeding."""
from __future__ import annotations

import random
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler


class TaskBalancedBatchSampler(Sampler[list[int]]):
    """Yields batches of sample keys in which every task present in ``task_ids`` appears.

    Each batch of ``batch_size`` gives ``batch_size // K`` slots to each of the K tasks and the remaining slots to
    tasks drawn without replacement by the seeded generator. A task's items are consumed from a seeded
    permutation, reshuffled when exhausted, so within one pass over a task's items none repeats. All ranks build
    the same global sequence of batches from ``(seed, epoch)``; rank ``r`` takes global batches
    ``r, r + world_size, ...``, which keeps the ranks disjoint within a pass and needs no communication.

    Keys are ``index + epoch * len(task_ids)``: datasets map a key to item ``key % len`` and seed the item's random
    crop/degradation with the whole key, so every epoch draws fresh patches reproducibly.

    Args:
        task_ids: the task id of every dataset index (``dataset.task_ids``).
        batch_size: samples per batch on this rank; at least the number of tasks.
        seed: seeds the whole sequence.
        rank, world_size: this process's place in a distributed run (torchrun's RANK / WORLD_SIZE).
        num_batches: batches per epoch per rank; default ``len(task_ids) // (batch_size * world_size)``, at least 1.
    """

    def __init__(self, task_ids: Sequence[int], batch_size: int, *, seed: int = 0, rank: int = 0,
                 world_size: int = 1, num_batches: Optional[int] = None):
        ids = np.asarray(list(task_ids) if not isinstance(task_ids, (np.ndarray, torch.Tensor)) else task_ids)
        if ids.ndim != 1 or ids.size == 0:
            raise ValueError(f"task_ids: expected a non-empty 1-D sequence of ints, got shape {ids.shape}")
        if not np.issubdtype(ids.dtype, np.integer):
            raise TypeError(f"task_ids: expected integers, got {ids.dtype}")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
        if not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size: expected a positive int, got {world_size!r}")
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank: expected 0 <= rank < world_size={world_size}, got {rank!r}")
        self.tasks = np.unique(ids)
        if batch_size < len(self.tasks):
            raise ValueError(f"batch_size: {batch_size} cannot hold every one of the {len(self.tasks)} tasks in each "
                             f"batch; use batch_size >= {len(self.tasks)} (per rank)")
        if num_batches is None:
            num_batches = max(1, len(ids) // (batch_size * world_size))
        if not isinstance(num_batches, int) or num_batches < 1:
            raise ValueError(f"num_batches: expected a positive int, got {num_batches!r}")
        self.n = int(ids.size)
        self.groups = [np.flatnonzero(ids == t) for t in self.tasks]
        self.batch_size = batch_size
        self.seed = int(seed)
        self.rank = rank
        self.world_size = world_size
        self.num_batches = num_batches
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch's sequence; skip its first ``start_batch`` batches of this rank (resuming mid-epoch)."""
        if epoch < 0 or not 0 <= start_batch <= self.num_batches:
            raise ValueError(f"set_epoch: expected epoch >= 0 and 0 <= start_batch <= {self.num_batches}, "
                             f"got {epoch}, {start_batch}")
        self.epoch = int(epoch)
        self.start_batch = int(start_batch)

    def __len__(self) -> int:
        return self.num_batches - self.start_batch

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng((self.seed, self.epoch))
        k = len(self.groups)
        perms = [rng.permutation(g) for g in self.groups]
        pos = [0] * k
        base, extra = divmod(self.batch_size, k)
        offset = self.epoch * self.n
        for g in range(self.num_batches * self.world_size):
            counts = np.full(k, base)
            if extra:
                counts[rng.choice(k, size=extra, replace=False)] += 1
            batch: list[int] = []
            for t in range(k):
                need = int(counts[t])
                while need:
                    if pos[t] == len(perms[t]):
                        perms[t] = rng.permutation(self.groups[t])
                        pos[t] = 0
                    take = min(need, len(perms[t]) - pos[t])
                    batch.extend(perms[t][pos[t]:pos[t] + take].tolist())
                    pos[t] += take
                    need -= take
            order = rng.permutation(len(batch))
            if g % self.world_size == self.rank and g // self.world_size >= self.start_batch:
                yield [int(batch[i]) + offset for i in order]


def worker_init_fn(worker_id: int) -> None:
    """Seed numpy's and Python's global generators from the worker's torch seed (distinct per worker and per
    loader generator). OpenCV is already sequential here (see tur_ext.data.io): reconfiguring its thread pool in a
    forked worker can hang on a lock that a parent thread held at fork time."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
