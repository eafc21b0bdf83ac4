"""DataLoaders tuned to the machine: worker count, pinned memory, persistent workers, prefetching."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from framework.errors import ConfigError
from framework.preemption import ignore_stop_signals_in_worker


def auto_num_workers() -> int:
    """Worker processes per training process: the CPU cores this process may use, shared among the processes of
    this machine, one left for the training process itself; at most 8 (more rarely helps and costs memory)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    processes_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(0, min(8, cores // processes_here - 1))


class EpochSampler(Sampler[int]):
    """The sample order of an epoch as a function of (seed, epoch) alone: the same on every rank and every run.

    Shuffled, it is the order accelerate's seedable sampler gives (a permutation drawn by a generator seeded with
    seed + epoch), so it replaces a shuffling `RandomSampler` exactly; it is not one, so accelerate keeps it, and
    `set_epoch` reaches it on one process and on several (accelerate forwards a loader's `set_epoch` to the dataset
    only when the sampler has none). When an epoch's order starts to be drawn, `on_epoch(epoch)` is called: the
    training transform learns the epoch its samples' augmentations belong to (`ImageBatchTransform.set_epoch`).
    That happens in the training process before the epoch's first index reaches a worker, after the previous
    epoch's batches were all served (or discarded), so no batch is built with another epoch's number.
    """

    def __init__(self, length: int, seed: int, shuffle: bool = True,
                 on_epoch: Callable[[int], None] | None = None):
        self.length, self.seed, self.shuffle, self.on_epoch = length, seed, shuffle, on_epoch
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[int]:
        epoch = self.epoch
        if self.on_epoch is not None:
            self.on_epoch(epoch)
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            yield from torch.randperm(self.length, generator=generator).tolist()
        else:
            yield from range(self.length)
        self.epoch = epoch + 1  # a loop that never calls set_epoch still gets a new order (and new draws) each epoch


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, num_workers: int | None = None,
                prefetch_factor: int = 2, seed: int | None = None, drop_last: bool = False,
                on_epoch: Callable[[int], None] | None = None) -> DataLoader:
    """A DataLoader with the settings that keep the accelerator fed.

    Args:
        num_workers: None picks `auto_num_workers()`; 0 loads in the training process (best for tiny in-memory data).
        prefetch_factor: batches each worker prepares ahead.
        seed: seeds the shuffling (an `EpochSampler`), so the order is the same on every run (and every rank).
        on_epoch: with `seed`, called with the epoch number as each epoch's order starts (see `EpochSampler`).
    """
    processes = int(os.environ.get("WORLD_SIZE", "1"))  # each process takes whole batches of its own
    if drop_last and len(dataset) < batch_size * processes:
        across = f" × {processes} processes = {batch_size * processes}" if processes > 1 else ""
        raise ConfigError(
            f"batch size {batch_size}{across} is larger than the {len(dataset)} samples of the split, and its last "
            f"incomplete batch is dropped, so an epoch would have no batch. Lower data.batch_size to at most "
            f"{max(len(dataset) // processes, 1)} or add data."
        )
    workers = auto_num_workers() if num_workers is None else num_workers
    sampler = EpochSampler(len(dataset), seed, shuffle, on_epoch) if seed is not None else None
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle if sampler is None else None,
        sampler=sampler,
        drop_last=drop_last,
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),  # page-locked host memory: faster, asynchronous copies to the GPU
        persistent_workers=workers > 0,  # no worker start-up cost at every epoch
        worker_init_fn=ignore_stop_signals_in_worker if workers > 0 else None,  # a stop signal reaches the whole tree
        prefetch_factor=prefetch_factor if workers > 0 else None,
        # Draws the workers' base seed, which then does not come from (and move) the training process's random stream.
        generator=torch.Generator().manual_seed(seed) if seed is not None else None,
    )


def shut_down_workers(loader: DataLoader) -> None:
    """End a loader's persistent worker processes now (they come back on its next iteration).

    Left to the garbage collector, an iterator inside a reference cycle (as a finished run's objects are) may have
    its queues finalized before it, and its workers then never receive the stop message: torch waits 5 s per worker
    before killing it. torch has no public call for this; its iterator's own shutdown is the one it runs itself."""
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()
    if iterator is not None:
        loader._iterator = None


def first_batches(loader: DataLoader, batches: int) -> DataLoader:
    """`--overfit_batches`: a loader over the first `batches` batches' samples, in the same order every epoch (their
    augmentations still change with the epoch)."""
    if not hasattr(loader.dataset, "__len__"):  # a stream: its first batches are not a fixed set to come back to
        raise ConfigError("--overfit_batches needs a map-style training split: drop --data.streaming true.")
    samples = min(len(loader.dataset), batches * loader.batch_size)
    on_epoch = getattr(loader.sampler, "on_epoch", None)
    return DataLoader(Subset(loader.dataset, range(samples)), batch_size=loader.batch_size,
                      sampler=EpochSampler(samples, 0, shuffle=False, on_epoch=on_epoch), collate_fn=loader.collate_fn)


def to_channels_last(batch: Any) -> Any:
    """A batch whose 4-D tensors (images) are in channels-last memory format, like the model's weights."""
    if isinstance(batch, dict):
        return {k: v.contiguous(memory_format=torch.channels_last) if torch.is_tensor(v) and v.dim() == 4 else v
                for k, v in batch.items()}
    return batch
