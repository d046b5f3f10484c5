"""Deterministic, resumable data order: one global sample stream, sharded by hand over processes.

The stream is the concatenation of per-epoch permutations; its order is a pure function of (seed, epoch):

    position p  ->  epoch p // n, dataset index epoch_permutation(n, seed, epoch)[p % n]

Every draw takes the next `chunk = world_size * micro_batch` positions of the stream; process `rank`
gets the contiguous slice [rank * micro_batch, (rank + 1) * micro_batch) of the chunk. An optimizer step
takes `grad_accum_steps` draws, so a global batch of B samples is B consecutive positions. The only state
is the number of positions consumed (`samples_seen`); resuming starts the stream there.

Randomness inside `dataset[i]` (random crops, flips) is seeded per sample from (seed, position), so it is
the same with or without worker processes, and after a resume. In the main process (num_workers=0) the
global RNG states are saved and restored around each fetch, so data loading never disturbs the training
RNG. Worker processes are also seeded from (seed, rank, resume position, worker id).
"""

from __future__ import annotations

import contextlib
import functools
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from ..data.image_text import DataError

__all__ = [
    "epoch_permutation",
    "GlobalOrder",
    "mix_seed",
    "PositionedDataset",
    "ShardedBatchSampler",
    "build_train_loader",
    "split_skipped",
    "is_empty_batch",
]

_MASK64 = (1 << 64) - 1


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The dataset order of `epoch`: a permutation of range(n) that depends only on (seed, epoch)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator)


def mix_seed(*values: int) -> int:
    """A well-mixed 63-bit seed from integers (splitmix64 over the sequence)."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = ((h ^ (int(v) & _MASK64)) + 0x9E3779B97F4A7C15) & _MASK64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 31
    return h >> 1


class GlobalOrder:
    """Maps stream positions to dataset indices, caching the permutation (a tensor) of the current epoch."""

    def __init__(self, n: int, seed: int):
        if n < 1:
            raise DataError("the training dataset is empty")
        self.n, self.seed = n, seed
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, epoch_permutation(self.n, self.seed, epoch)
        return self._perm

    def index(self, position: int) -> int:
        return int(self._permutation(position // self.n)[position % self.n])

    def indices(self, start: int, stop: int) -> list[int]:
        """Dataset indices of positions [start, stop), which may span epochs."""
        out: list[int] = []
        while start < stop:
            epoch, offset = divmod(start, self.n)
            take = min(stop - start, self.n - offset)
            out += self._permutation(epoch)[offset : offset + take].tolist()
            start += take
        return out


class ShardedBatchSampler(Sampler):
    """Endless micro-batches of (dataset index, stream position) pairs for one process, from `start` on."""

    def __init__(self, n: int, *, seed: int, micro_batch: int, world_size: int, rank: int, start: int = 0):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of size {world_size}")
        self.order = GlobalOrder(n, seed)
        self.micro_batch, self.world_size, self.rank, self.start = micro_batch, world_size, rank, start

    @property
    def chunk(self) -> int:
        """Positions consumed by one draw (all processes together)."""
        return self.micro_batch * self.world_size

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        position = self.start
        while True:
            first = position + self.rank * self.micro_batch
            indices = self.order.indices(first, first + self.micro_batch)
            yield list(zip(indices, range(first, first + self.micro_batch)))
            position += self.chunk


@contextlib.contextmanager
def _seeded_rng(seed: int, restore: bool) -> Iterator[None]:
    saved = (torch.get_rng_state(), random.getstate(), np.random.get_state()) if restore else None
    torch.default_generator.manual_seed(seed)  # CPU only: torch.manual_seed would also queue lazy CUDA seeding
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        if saved is not None:
            torch.set_rng_state(saved[0])
            random.setstate(saved[1])
            np.random.set_state(saved[2])


class PositionedDataset(Dataset):
    """Wraps a map-style dataset; item (index, position) is fetched under an RNG seeded from (seed, position)."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, position = key
        with _seeded_rng(mix_seed(self.seed, position), restore=get_worker_info() is None):
            return self.dataset[index]


def split_skipped(batch: Any) -> tuple[Any, int, list[str]]:
    """(batch without its "num_skipped" and "skip_reasons" entries, that count, those reasons); batches without
    them count 0 and give no reasons."""
    if isinstance(batch, Mapping) and ("num_skipped" in batch or "skip_reasons" in batch):
        batch = dict(batch)
        return batch, int(batch.pop("num_skipped", 0)), list(batch.pop("skip_reasons", []))
    return batch, 0, []


def is_empty_batch(batch: Any) -> bool:
    """Whether a collated batch holds no samples (its first tensor has a leading dimension of 0)."""
    if isinstance(batch, torch.Tensor):
        return batch.ndim > 0 and batch.shape[0] == 0
    if not isinstance(batch, (Mapping, list, tuple)):
        return False
    values = list(batch.values()) if isinstance(batch, Mapping) else list(batch)
    first = next((v for v in values if isinstance(v, torch.Tensor) and v.ndim > 0), None)
    return not values or (first is not None and first.shape[0] == 0)


def _seed_worker(worker_id: int, base_seed: int) -> None:
    seed = mix_seed(base_seed, worker_id)
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def build_train_loader(
    dataset: Dataset,
    collate_fn: Callable[[Sequence[Any]], Any] | None,
    *,
    seed: int,
    micro_batch: int,
    world_size: int,
    rank: int,
    start: int,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """An endless DataLoader over this process's shard of the global stream, starting at position `start`."""
    sampler = ShardedBatchSampler(
        len(dataset), seed=seed, micro_batch=micro_batch, world_size=world_size, rank=rank, start=start
    )
    worker_seed = mix_seed(seed, rank, start)
    return DataLoader(
        PositionedDataset(dataset, seed),
        batch_sampler=sampler,
        collate_fn=collate_fn,
        num_workers=num_workers,
        pin_memory=pin_memory,
        worker_init_fn=functools.partial(_seed_worker, base_seed=worker_seed) if num_workers > 0 else None,
        # DataLoader draws its base seed from this generator; without one it would consume the global RNG.
        generator=torch.Generator().manual_seed(worker_seed),
    )
