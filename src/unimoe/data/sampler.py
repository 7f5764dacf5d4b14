"""A batch sampler that groups samples by modality and length, shuffles, and shards across processes.

Each epoch is a list of *global* batches (``batch_size * num_replicas`` indices): within each modality
group the indices are shuffled, cut into mega-batches, sorted by length inside each mega-batch (so
that a batch pads little) and cut into global batches; the remainders of all groups form mixed
batches; then the batch order is shuffled. Process ``rank`` takes the ``rank``-th slice of every
global batch, like ``DistributedSampler``: the same global batches are seen whatever the number of
processes, and every process gets the same number of micro-batches. Everything is a function of
``seed`` and ``epoch``; ``start`` skips batches already consumed (exact resume).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler


class GroupedBatchSampler(Sampler[list[int]]):
    """Yields this process's micro-batches (lists of dataset indices) for the current epoch."""

    def __init__(
        self,
        groups: Sequence[str],
        lengths: Sequence[int],
        batch_size: int,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        group_by_modality: bool = True,
        group_by_length: bool = True,
        megabatch_factor: int = 8,
        drop_last: bool = False,
    ):
        if len(groups) != len(lengths):
            raise ValueError("groups and lengths must have one entry per sample")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} outside [0, {num_replicas})")
        self.groups = list(groups)
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.shuffle = shuffle
        self.group_by_modality = group_by_modality
        self.group_by_length = group_by_length
        self.megabatch_factor = megabatch_factor
        self.drop_last = drop_last
        self.epoch = 0
        self.start = 0

    @property
    def global_batch_size(self) -> int:
        """Indices per global batch (all processes together)."""
        return self.batch_size * self.num_replicas

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Selects the epoch whose order ``__iter__`` yields, from its ``start``-th batch on."""
        self.epoch = epoch
        self.start = start

    def _generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)

    def _split_group(self, indices: list[int], gen: torch.Generator) -> tuple[list[list[int]], list[int]]:
        """Full global batches of one group, and its remainder."""
        size = self.global_batch_size
        if self.shuffle:
            indices = [indices[i] for i in torch.randperm(len(indices), generator=gen).tolist()]
        mega = size * self.megabatch_factor
        batches: list[list[int]] = []
        for begin in range(0, len(indices), mega):
            chunk = indices[begin : begin + mega]
            if self.group_by_length:
                chunk = sorted(chunk, key=lambda i: -self.lengths[i])
            batches += [chunk[j : j + size] for j in range(0, len(chunk), size)]
        if batches and len(batches[-1]) < size:
            return batches[:-1], batches[-1]
        return batches, []

    def global_batches(self) -> list[list[int]]:
        """Every global batch of the current epoch, in order (the last may be short unless dropped)."""
        gen = self._generator()
        order = list(range(len(self.groups)))
        if not self.shuffle:
            size = self.global_batch_size
            batches = [order[i : i + size] for i in range(0, len(order), size)]
        else:
            keys = sorted(set(self.groups)) if self.group_by_modality else [None]
            batches, rest = [], []
            for key in keys:
                members = [i for i in order if key is None or self.groups[i] == key]
                full, remainder = self._split_group(members, gen)
                batches += full
                rest += remainder
            size = self.global_batch_size
            batches += [rest[i : i + size] for i in range(0, len(rest), size)]
            batches = [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]
            batches.sort(key=len, reverse=True)  # a short batch, if any, goes last (stable otherwise)
        if self.drop_last and batches and len(batches[-1]) < self.global_batch_size:
            batches = batches[:-1]
        return batches

    def shard(self, batch: list[int]) -> list[int]:
        """This process's slice of a global batch; a short batch is padded by wrapping around."""
        size = self.global_batch_size
        if len(batch) < size:
            batch = [batch[i % len(batch)] for i in range(size)]
        return batch[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.global_batches()[self.start :]:
            yield self.shard(batch)

    def __len__(self) -> int:
        """Micro-batches per epoch (the same on every process, before ``start`` is applied)."""
        return len(self.global_batches())
