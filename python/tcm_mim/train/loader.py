"""Batches of a crop stream through ``torch.utils.data.DataLoader``: worker processes, prefetch, DDP shards.

Batch ``step`` of rank ``r`` (of ``world``) holds the stream's items
``[(step * world + r) * B, (step * world + r + 1) * B)``, and item ``i`` is a pure function of
``(seed, i)`` (:mod:`tcm_mim.train.stream`). So every batch is a pure function of
(seed, global step, rank, index in the batch): the ranks draw disjoint items, and a loader
with any number of workers, or one rebuilt at a resumed step, yields exactly the same batches.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


class StreamItems(Dataset):
    """Map-style view of a stream: ``dataset[i] = stream.item(i)`` (image [1, *crop], saliency [1, *crop])."""

    def __init__(self, stream) -> None:
        self.stream = stream

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.stream.item(index)

    def __len__(self) -> int:
        return 2**62  # the stream is endless; the batch sampler decides which items are read


class StepBatches(Sampler[list[int]]):
    """The item indices of batches ``start .. end - 1`` of one rank (see the module docstring)."""

    def __init__(self, batch_size: int, start: int, end: int, *, rank: int = 0, world: int = 1) -> None:
        if batch_size < 1 or not 0 <= rank < world or start < 0:
            raise ValueError(f"StepBatches: need batch_size >= 1, 0 <= rank < world, start >= 0; got batch_size "
                             f"{batch_size}, rank {rank}, world {world}, start {start}")
        self.batch_size, self.start, self.end, self.rank, self.world = batch_size, start, end, rank, world

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start, self.end):
            first = (step * self.world + self.rank) * self.batch_size
            yield list(range(first, first + self.batch_size))

    def __len__(self) -> int:
        return max(self.end - self.start, 0)


def _worker_init(_worker_id: int) -> None:
    torch.set_num_threads(1)  # the workers share the cores with the training step: no thread pools inside


def build_loader(stream, batch_size: int, start: int, end: int, *, rank: int = 0, world: int = 1,
                 num_workers: int = 0, prefetch_factor: int = 2, pin_memory: bool | None = None) -> DataLoader:
    """A DataLoader over batches ``start .. end - 1`` of ``stream`` for one rank.

    Args:
        stream: a :class:`~tcm_mim.train.stream.SliceStream` or ``VolumeStream`` (``item(i)`` pure in i).
        num_workers: worker processes (0: batches are built in this process); they persist for the
            loader's life and each prefetches ``prefetch_factor`` batches.
        pin_memory: page-locked batches for fast host-to-GPU copies; default: when CUDA is available.

    Yields:
        (images float [B, 1, *crop], saliency float [B, 1, *crop]) per step.
    """
    if num_workers < 0:
        raise ValueError(f"build_loader: num_workers must be >= 0, got {num_workers}")
    if prefetch_factor < 1:
        raise ValueError(f"build_loader: prefetch_factor must be >= 1, got {prefetch_factor}")
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    workers = dict(prefetch_factor=prefetch_factor, persistent_workers=True, worker_init_fn=_worker_init) \
        if num_workers else {}
    return DataLoader(StreamItems(stream), batch_sampler=StepBatches(batch_size, start, end, rank=rank, world=world),
                      num_workers=num_workers, pin_memory=pin_memory, **workers)
