"""DataLoaders tuned to the machine: worker count, pinned memory, persistent workers, prefetching."""

from __future__ import annotations

import os

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from framework.errors import ConfigError


def auto_num_workers() -> int:
    """Worker processes per training process: the CPU cores this process may use, shared among the processes of
    this machine, one left for the training process itself; at most 8 (more rarely helps and costs memory)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    processes_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(0, min(8, cores // processes_here - 1))


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, num_workers: int | None = None,
                prefetch_factor: int = 2, seed: int | None = None, drop_last: bool = False) -> DataLoader:
    """A DataLoader with the settings that keep the accelerator fed.

    Args:
        num_workers: None picks `auto_num_workers()`; 0 loads in the training process (best for tiny in-memory data).
        prefetch_factor: batches each worker prepares ahead.
        seed: seeds the shuffling generator, so the order is the same on every run (and every rank).
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
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=drop_last,
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),  # page-locked host memory: faster, asynchronous copies to the GPU
        persistent_workers=workers > 0,  # no worker start-up cost at every epoch
        prefetch_factor=prefetch_factor if workers > 0 else None,
        generator=torch.Generator().manual_seed(seed) if seed is not None else None,
    )


def first_batches(loader: DataLoader, batches: int) -> DataLoader:
    """`--overfit_batches`: a loader over the first `batches` batches' samples, in the same order every epoch."""
    samples = min(len(loader.dataset), batches * loader.batch_size)
    return DataLoader(Subset(loader.dataset, range(samples)), batch_size=loader.batch_size, shuffle=False,
                      collate_fn=loader.collate_fn)
