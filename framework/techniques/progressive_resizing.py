"""Progressive resizing (fast.ai's DAWNBench ImageNet runs; Touvron et al., https://arxiv.org/abs/1906.06423 on why
testing at full size still works): train the first epochs on smaller images, which are cheaper, then at full size.

The size is set in the data pipeline, before batching (the training loader's transform builds each batch at the
current size, its worker processes included), not by resizing batches after loading. Evaluation is always at full
size. Hook: `epoch_start`.
"""

from __future__ import annotations

import math

from framework.data.images import size_control
from framework.errors import ConfigError, require
from framework.state import TrainState
from framework.technique import Technique, register


def progressive_size(epoch: int, total_epochs: int, final_size: int, start_fraction: float = 0.5,
                     ramp_fraction: float = 0.5, multiple: int = 4) -> int:
    """The training image size at `epoch` (0-based): from start_fraction·final_size, rising linearly over the first
    ramp_fraction of the epochs, then final_size; rounded to a multiple of `multiple` (kernels like even sizes)."""
    ramp_epochs = round(ramp_fraction * total_epochs)
    if epoch >= ramp_epochs:
        return final_size
    fraction = start_fraction + (1.0 - start_fraction) * epoch / ramp_epochs
    return min(final_size, max(multiple, round(final_size * fraction / multiple) * multiple))


@register("progressive_resizing")
class ProgressiveResizing(Technique):
    """Smaller training images in the early epochs, full size after.

    Args:
        start_fraction: the first epoch's size as a fraction of the full `data.image_size`.
        ramp_fraction: the share of the epochs over which the size rises to full; full size after that.
        multiple: sizes are rounded to a multiple of this.
    """

    def __init__(self, start_fraction: float = 0.5, ramp_fraction: float = 0.5, multiple: int = 4):
        require(0 < start_fraction <= 1,
                f"progressive_resizing.start_fraction must be in (0, 1], got {start_fraction}.")
        require(0 <= ramp_fraction <= 1, f"progressive_resizing.ramp_fraction must be in [0, 1], got {ramp_fraction}.")
        require(multiple >= 1, f"progressive_resizing.multiple must be ≥ 1, got {multiple}.")
        self.start_fraction, self.ramp_fraction, self.multiple = start_fraction, ramp_fraction, multiple
        self.control = None

    def fit_start(self, state: TrainState) -> None:
        self.control = size_control(state.train_data)
        if self.control is None:
            raise ConfigError("progressive_resizing needs a training loader built by framework.data.image_data "
                              "(it sets the image size inside that loader's pipeline). Remove it for other data.")

    def epoch_start(self, state: TrainState) -> None:
        total_epochs = math.ceil(state.max_steps / state.steps_per_epoch)
        size = progressive_size(state.epoch, total_epochs, self.control.full_size, self.start_fraction,
                                self.ramp_fraction, self.multiple)
        self.control.set_size(size)
        state.log(**{"progressive_resizing/image_size": size})

    def fit_end(self, state: TrainState) -> None:
        self.control.set_size(self.control.full_size)
