"""Built-in techniques. Importing this package registers them by name for configs."""

from framework.techniques.ema import EMA, ema_update_
from framework.techniques.grad_clipping import GradientClipping
from framework.techniques.lr_schedule import (
    CosineLR,
    CosineRestartsLR,
    ExponentialLR,
    LRSchedule,
    MultiStepLR,
    OneCycleLR,
    PlateauLR,
    StepLR,
    schedule_lrs,
)

__all__ = [
    "EMA", "CosineLR", "CosineRestartsLR", "ExponentialLR", "GradientClipping", "LRSchedule", "MultiStepLR",
    "OneCycleLR", "PlateauLR", "StepLR", "ema_update_", "schedule_lrs",
]
