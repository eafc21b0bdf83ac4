"""Streaming training data: a `datasets.IterableDataset` read rank by rank, shuffled, and resumed exactly.

Each rank reads only its own part of the source (`datasets.distributed.split_dataset_by_node`: whole shards when
their count divides the world size, else every world_size-th row). Rows are read in chunks of `shuffle_buffer`;
each chunk is permuted by a generator seeded from (seed, epoch, chunk number), so the order is a function of the
data and those numbers alone. The position saved with a checkpoint is (chunk number, items of the chunk already
given out, the stream's `state_dict()` at the chunk's start): a resumed run loads that state, reads that one chunk
again, permutes it the same way and continues after the items given out. It never reads the consumed chunks
before it, and the order is bitwise the one the uninterrupted run had. (datasets' own buffer shuffle is not
restored exactly by its `state_dict`: the buffer's contents are lost and refilled.)

The loader reads in the training process (no worker processes: the position then lives in one place), puts each
batch on the device itself, and is handed to `accelerate.prepare` as already prepared, so accelerate neither
dispatches its batches from the main process nor makes each rank read everything and keep a slice; DeepSpeed
still reads its micro-batch size from it. Every rank takes the same number of batches per epoch: the smallest
rank's rows // batch_size (its last incomplete batch dropped), when the row count is known; otherwise the run is
one pass-cycling epoch of `--max_steps` steps.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import json
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import islice
from typing import Any

import datasets
import torch
from accelerate.state import GradientState, PartialState
from accelerate.utils import send_to_device
from datasets.distributed import split_dataset_by_node
from torch.utils.data import DataLoader, IterableDataset

from framework.errors import ConfigError


def keep_large_blocks_in_mmaps(threshold: int = 1 << 20) -> bool:
    """Make glibc's malloc serve every block of `threshold` bytes or more from an mmap of its own, for the rest of
    the process. Returns whether it did (not on another C library, nor where MALLOC_MMAP_THRESHOLD_ is set: the
    user's choice stays).

    Why: by default glibc raises that threshold to the largest block freed so far (up to 32 MiB). A stream frees
    multi-megabyte blocks (a file's read chunk, a run of packed documents), after which every block below that size
    comes from the heap, whose freed fragments stay resident: the process grows with the amount streamed (+16% from
    10% to 100% of a 1 GB text corpus, `benchmarks/streaming.py`). A fixed threshold (setting one turns the raising
    off) returns large blocks to the system whole when freed: +0.8% over the same corpus, at the same speed."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        gnu = bool(name) and hasattr(libc, "gnu_get_libc_version")
    except OSError:
        return False
    m_mmap_threshold = -3  # malloc.h
    return gnu and libc.mallopt(m_mmap_threshold, threshold) == 1


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of processes, as the launcher set them (data is built before the
    Accelerator exists)."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


@dataclass
class RankStream:
    """This rank's part of a source: `make()` gives a fresh `IterableDataset` of its rows (a fresh one per pass:
    a loaded `state_dict` stays with the object); `rows` is what every rank takes per epoch (None: unknown)."""

    make: Callable[[], datasets.IterableDataset]
    rows: int | None


def rank_stream(source: datasets.IterableDataset, rank: int, world: int,
                shard_rows: list[int] | None = None) -> RankStream:
    """Split `source` for `rank`. `shard_rows`: the rows of each of its shards, in order, where known (parquet
    metadata, an in-memory source); the per-rank row count is then the smallest rank's."""
    known = shard_rows is not None and len(shard_rows) == source.num_shards
    if source.num_shards % world == 0:  # whole shards per rank: rank r reads shards r, r + world, ... only
        strategy = "shards"
        rows = min(sum(shard_rows[r::world]) for r in range(world)) if known else None
    else:  # every rank reads the stream and keeps every world-th row: rank r has ceil((N - r) / world) >= N // world
        strategy = "examples"
        rows = sum(shard_rows) // world if known else None
    return RankStream(lambda: split_dataset_by_node(source, rank, world, strategy=strategy), rows)


def in_memory_stream(dataset: datasets.Dataset, rank: int, world: int) -> RankStream:
    """A map-style split read as a stream: one contiguous shard per rank (sizes N // world or one more)."""
    n = len(dataset)
    return rank_stream(dataset.to_iterable_dataset(num_shards=world), rank, world,
                       [n // world + (1 if i < n % world else 0) for i in range(world)])


def chunk_seed(seed: int, epoch: int, chunk: int) -> int:
    """The permutation seed of one chunk: a hash, so nearby numbers give unrelated orders."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{chunk}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class StreamingSplit(IterableDataset):
    """This rank's items in chunked-shuffle order from a position (see the module docstring).

    Args:
        prepare: (rows of one chunk, position of its first row in this rank's stream) -> the chunk's items (an
            image row stays one item; text documents become packed blocks).
        image_transform: the training transform progressive resizing finds (`size_control`), if any.
    """

    def __init__(self, stream: RankStream, prepare: Callable[[list[dict], int], list[Any]], seed: int,
                 buffer: int, shuffle: bool = True, image_transform: Any = None):
        self.stream, self.prepare, self.seed, self.buffer, self.shuffle = stream, prepare, seed, buffer, shuffle
        self.image_transform = image_transform

    def items(self, epoch: int, position: dict | None = None) -> Iterator[tuple[Any, dict]]:
        """(item, the position after it) from `position` (None: the start of the stream) to the stream's end."""
        source = self.stream.make()
        chunk, skip, start = (0, 0, None) if position is None else (
            position["chunk"], position["offset"], position["source_state"])
        if start is not None:
            source.load_state_dict(json.loads(start))
        rows = iter(source)
        while True:
            block = list(islice(rows, self.buffer))
            if not block:
                return
            after = json.dumps(source.state_dict())  # where the next chunk starts: taken before any item goes out
            items = self.prepare(block, chunk * self.buffer)
            order = (torch.randperm(len(items), generator=torch.Generator().manual_seed(
                chunk_seed(self.seed, epoch, chunk))).tolist() if self.shuffle else range(len(items)))
            for offset in range(skip, len(items)):
                yield items[order[offset]], {"chunk": chunk, "offset": offset + 1, "source_state": start}
            chunk, skip, start = chunk + 1, 0, after

    def __iter__(self) -> Iterator[Any]:
        return (item for item, _ in self.items(0))


class StreamingLoader(DataLoader):
    """Batches of a `StreamingSplit` on this process's device, `length` per epoch (None: set by the loop from
    `--max_steps`), with its position in `state_dict` (every rank's, gathered: a checkpoint holds them all).

    `on_epoch(n)` is called as pass `n` starts (the image transform's augmentation epoch)."""

    _is_accelerate_prepared = True  # accelerate's prepare keeps it as it is: it reads only this rank's rows already
    restores_position = True  # the loop resumes it by its state, not by skipping batches

    def __init__(self, split: StreamingSplit, batch_size: int, collate: Callable[[list[Any]], Any],
                 length: int | None, on_epoch: Callable[[int], None] | None = None, non_blocking: bool = False):
        super().__init__(split, batch_size=batch_size, collate_fn=collate)
        keep_large_blocks_in_mmaps()  # resident memory flat in the amount streamed
        self.length, self.on_epoch, self.non_blocking = length, on_epoch, non_blocking
        self.epoch = self.batches = self.passes = 0
        self.position: dict | None = None
        self.end_of_dataloader = False  # read by accelerate's GradientState: the epoch's last window steps

    def __len__(self) -> int:
        if self.length is None:
            raise TypeError("the stream's length is unknown: the loop sets it from --max_steps")
        return self.length

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.batches, self.passes, self.position = epoch, 0, 0, None

    def __iter__(self) -> Iterator[Any]:
        device = PartialState().device
        gradient_state = GradientState()
        if self not in gradient_state.dataloader_references:  # as accelerate's loaders do: `accumulate` sees the end
            gradient_state._add_dataloader(self)
        self._iterations = generation = getattr(self, "_iterations", 0) + 1
        self.end_of_dataloader = False
        try:
            while self.length is None or self.batches < self.length:
                round_ = self.epoch + self.passes  # one of the two is 0: known length -> epochs, else passes
                if self.on_epoch is not None:
                    self.on_epoch(round_)
                pending: list[Any] = []
                batches_before = self.batches
                for item, position in self.dataset.items(round_, self.position):
                    pending.append(item)
                    if len(pending) < self.batch_size:
                        continue
                    batch, pending = self.collate_fn(pending), []
                    self.position, self.batches = position, self.batches + 1
                    self.end_of_dataloader = self.batches == self.length
                    yield send_to_device(batch, device, non_blocking=self.non_blocking)
                    if self.end_of_dataloader:
                        break
                else:  # this rank's stream ran out
                    if self.length is not None:
                        raise RuntimeError(f"the stream ended after {self.batches} of the {self.length} batches "
                                           "announced for this epoch: the row count given for it was too high")
                    if self.batches == batches_before and self.position is None:  # a whole pass, not one batch
                        raise ConfigError(f"data.streaming: a whole pass over this process's part of the stream "
                                          f"holds fewer items than one batch ({self.batch_size}): lower the batch "
                                          "size or add data.")
                    self.passes, self.position = self.passes + 1, None  # next pass, reshuffled
            self.epoch, self.batches, self.passes, self.position = self.epoch + 1, 0, 0, None
        finally:
            if self._iterations == generation:  # not an abandoned iteration closed after a newer one started
                gradient_state._remove_dataloader(self)
                self.end_of_dataloader = False

    def state_dict(self) -> dict[str, Any]:
        mine = json.dumps({"epoch": self.epoch, "batches": self.batches, "passes": self.passes,
                           "position": self.position})
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        ranks = [None] * world
        if world > 1:  # every rank saves the checkpoint together: each one's position, in rank order
            torch.distributed.all_gather_object(ranks, mine)
        else:
            ranks = [mine]
        return {"ranks": ranks}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        rank, world = rank_and_world()
        if len(state["ranks"]) != world:
            raise ConfigError(f"the checkpoint's streaming position was saved by {len(state['ranks'])} processes; "
                              f"a streaming run resumes exactly only with the same number (this one has {world}).")
        saved = json.loads(state["ranks"][rank])
        self.epoch, self.batches, self.passes, self.position = (saved["epoch"], saved["batches"], saved["passes"],
                                                                 saved["position"])


def steps_per_epoch(loader: DataLoader, max_steps: int | None, accumulation: int) -> int:
    """Optimizer steps per epoch: each rank's micro-batches (`len(loader)`, or for a stream of unknown length the
    whole run: `max_steps` steps, the stream cycled through as often as needed) in groups of `accumulation`, the
    last one possibly short. Refuses a run that would have no end."""
    if getattr(loader, "length", 0) is None:
        if max_steps is None:
            raise ConfigError("data.streaming: the stream's length is unknown (its row count is not recorded), so "
                              "an epoch has no end: pass --max_steps N to define the run by its steps.")
        loader.length = max_steps * accumulation
    return math.ceil(len(loader) / accumulation)
