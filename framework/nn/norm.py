"""Normalisation-layer helpers the loop and techniques share."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn
from torch.nn.modules.batchnorm import _NormBase


@contextmanager
def frozen_running_statistics(model: nn.Module) -> Iterator[None]:
    """Inside, training-mode BatchNorm (and other running-statistics norms) normalise with batch statistics as usual
    but leave `running_mean`, `running_var` and `num_batches_tracked` untouched.

    For a second forward pass on the same batch within one step (SAM's pass at the perturbed weights): the running
    statistics should move once per step, from the pass at the real weights. With `track_running_stats` off, torch's
    training-mode forward uses the batch statistics and passes no running buffers, so nothing is updated or copied.
    """
    norms = [m for m in model.modules() if isinstance(m, _NormBase) and m.training and m.track_running_stats]
    for module in norms:
        module.track_running_stats = False
    try:
        yield
    finally:
        for module in norms:
            module.track_running_stats = True
