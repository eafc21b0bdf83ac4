"""Built-in techniques. Importing this package registers them by name for configs."""

from framework.techniques.ema import EMA, ema_update_
from framework.techniques.grad_clipping import GradientClipping
from framework.techniques.lr_schedule import WarmupCosine, warmup_cosine_factor

__all__ = ["EMA", "GradientClipping", "WarmupCosine", "ema_update_", "warmup_cosine_factor"]
