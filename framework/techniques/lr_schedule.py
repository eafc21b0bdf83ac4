"""Linear warmup followed by cosine decay, stepped once per optimizer step.

Loshchilov & Hutter, SGDR (https://arxiv.org/abs/1608.03983); warmup: Goyal et al. (https://arxiv.org/abs/1706.02677).
Hooks: `fit_start` (builds a `torch.optim.lr_scheduler.LambdaLR` once the run's length is known) and
`after_optimizer_step` (steps it). The schedule is not passed to `accelerator.prepare`: accelerate's wrapper steps
it once per process, which would run the schedule `num_processes` times too fast.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from framework.errors import ConfigError
from framework.state import TrainState
from framework.technique import Technique, register


def warmup_cosine_factor(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0) -> float:
    """The LR multiplier for optimizer step `step` (0-based).

    Warmup: (step + 1) / warmup_steps for step < warmup_steps, so the first step already learns and the last
    warmup step reaches the peak. Then cosine from 1 at `warmup_steps` to `min_lr_ratio` at `total_steps`.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


@register("warmup_cosine")
class WarmupCosine(Technique):
    """Linear warmup then cosine decay of every parameter group's LR (each group keeps its own peak LR).

    Args:
        warmup_steps: warmup length in optimizer steps; or
        warmup_epochs: warmup length in epochs (converted with this run's real optimizer steps per epoch).
        min_lr_ratio: the final LR as a fraction of the peak LR.
    """

    def __init__(self, warmup_steps: int | None = None, warmup_epochs: float | None = None, min_lr_ratio: float = 0.0):
        if warmup_steps is not None and warmup_epochs is not None:
            raise ConfigError("warmup_cosine: give warmup_steps or warmup_epochs, not both.")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ConfigError(f"warmup_cosine.min_lr_ratio must be within [0, 1], got {min_lr_ratio}.")
        self.warmup_steps = warmup_steps
        self.warmup_epochs = warmup_epochs
        self.min_lr_ratio = min_lr_ratio
        self.scheduler: torch.optim.lr_scheduler.LambdaLR | None = None

    def fit_start(self, state: TrainState) -> None:
        if self.warmup_epochs is not None:
            warmup = round(self.warmup_epochs * state.steps_per_epoch)
        else:
            warmup = self.warmup_steps or 0
        if warmup >= state.max_steps:
            raise ConfigError(
                f"warmup_cosine: warmup ({warmup} steps) is not shorter than the whole run ({state.max_steps} steps); "
                "shorten the warmup or train longer."
            )
        total, floor = state.max_steps, self.min_lr_ratio
        # accelerate's optimizer wrapper shares its param_groups with the optimizer inside (torch's, or DeepSpeed's).
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            state.optimizer, lambda step: warmup_cosine_factor(step, warmup, total, floor)
        )

    def after_optimizer_step(self, state: TrainState) -> None:
        if not getattr(state.optimizer, "step_was_skipped", False):  # fp16 overflow: the step did not happen
            self.scheduler.step()

    def state_dict(self) -> dict[str, Any]:
        return self.scheduler.state_dict()

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self.scheduler.load_state_dict(dict(state_dict))
