"""Accumulation windows: which micro-batches make up one optimizer step, and how much each one's loss weighs in it.
The loop consumes these; they hold no state of their own, so a resumed run rebuilds them from its position."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from typing import Any

import torch
from accelerate import Accelerator

from framework.task import Task


def window_loss_scale(batch_in_epoch: int, batches_per_epoch: int, accumulation: int) -> float:
    """The factor for one micro-batch's loss so that every optimizer step applies the mean over the micro-batches
    it holds. accelerate divides every loss by k; the epoch's last window may hold only r < k micro-batches (its
    step comes at the end of the data), so those are scaled by k / r, else that step would apply r/k of a mean."""
    remainder = batches_per_epoch % accumulation
    return accumulation / remainder if remainder and batch_in_epoch >= batches_per_epoch - remainder else 1.0


@dataclass
class MicroBatch:
    """A micro-batch and its place in its accumulation window (the micro-batches of one optimizer step)."""

    batch: Any
    ends_window: bool
    """The window's optimizer step follows this micro-batch."""
    share: torch.Tensor | None = None
    """When the task counts loss items: this micro-batch's items / the whole step's items over all ranks."""
    window_size: int = 1
    """Micro-batches in the window (k, or fewer in the epoch's last window)."""

    def loss_scale(self, batch_in_epoch: int, batches_per_epoch: int, accumulation: int, processes: int
                   ) -> float | torch.Tensor:
        """The factor of this micro-batch's loss in backward. A mean over equal-weight samples: each micro-batch
        weighs alike (`window_loss_scale`). Counted items: its share of the step's items, times k and the ranks,
        which accelerate / DDP divide by."""
        if self.share is None:
            return window_loss_scale(batch_in_epoch, batches_per_epoch, accumulation)
        return self.share * (accumulation * processes)

    def logged_loss(self, loss: torch.Tensor, processes: int) -> torch.Tensor:
        """The value train/loss averages: the window's mean over micro-batches and ranks, weighted by their shares of
        the step's items, is then the step's plain mean over its items."""
        return loss if self.share is None else loss * (self.share * self.window_size * processes)

    def sync_context(self, accelerator: Accelerator, model: torch.nn.Module) -> contextlib.AbstractContextManager:
        """The gradient-sync context of this micro-batch. accelerate's `accumulate` counts the window itself and
        ends one early at the end of the data; a read-ahead window has already reached the end of the data when its
        first micro-batch runs, so it says where the window ends instead (as the HF Trainer does)."""
        if self.share is None:
            return accelerator.accumulate(model)
        accelerator.sync_gradients = self.ends_window  # the optimizer steps (and DeepSpeed's boundary) only then
        return contextlib.nullcontext() if self.ends_window else accelerator.no_sync(model)


def micro_batches(batches: Iterable, first: int, per_epoch: int, accumulation: int, task: Task,
                  accelerator: Accelerator) -> Iterator[MicroBatch]:
    """The epoch's batches from position `first` on, each with its place in its window; windows end every
    `accumulation` micro-batches and at the epoch's end.

    When the task counts loss items (`Task.loss_items`), each window is read ahead, as the HF Trainer does, so that
    every micro-batch's loss can be weighted by its share of the items of the whole step (one all-reduce per window,
    on the device). Otherwise batches pass through one at a time, as the loader gives them."""
    iterator = iter(batches)
    position = first
    for batch in iterator:
        window_end = min(per_epoch, (position // accumulation + 1) * accumulation)
        items = task.loss_items(batch)
        if items is None:
            position += 1
            yield MicroBatch(batch, ends_window=position == window_end)
            continue
        window = [(batch, items)] + [(b, task.loss_items(b)) for b in islice(iterator, window_end - position - 1)]
        # clamp: a step of padding only has no items; its micro-batches' losses are 0 and get weight 0
        total = accelerator.reduce(torch.stack([n for _, n in window]).sum(), reduction="sum").clamp(min=1)
        for index, (b, n) in enumerate(window):
            yield MicroBatch(b, ends_window=index == len(window) - 1, share=n / total, window_size=len(window))
        position += len(window)
