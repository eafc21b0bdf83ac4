"""Parameters as their model declares them, also when DeepSpeed ZeRO-3 holds only this rank's shard."""

from __future__ import annotations

import torch


def full_shape(parameter: torch.Tensor) -> torch.Size:
    """The parameter's whole shape. A model built under ZeRO-3's partitioned init (`deepspeed.zero.Init`) holds an
    empty tensor on every rank until its weights are gathered; DeepSpeed keeps the real shape in `ds_shape`."""
    return getattr(parameter, "ds_shape", parameter.shape)


def is_partitioned(model: torch.nn.Module) -> bool:
    """True when ZeRO-3 partitioned the model's weights (as it was built, or when it was prepared)."""
    return any(hasattr(parameter, "ds_id") for parameter in model.parameters())
