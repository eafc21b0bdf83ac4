"""The optimizer section every recipe shares: AdamW or SGD with Nesterov momentum."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch

from framework.errors import ConfigError


@dataclass
class OptimizerConfig:
    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = 0.01
    """Peak learning rate."""
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW's betas."""
    momentum: float = 0.9
    """SGD's (Nesterov) momentum."""

    def __post_init__(self) -> None:
        # torch would reject these only when the optimizer is built, as a ValueError traceback.
        if not self.lr > 0:
            raise ConfigError(f"optimizer.lr must be positive, got {self.lr}. Set --optimizer.lr to the peak learning "
                              "rate, e.g. 0.01 (schedules and warmup lower it from there).")
        if not self.weight_decay >= 0:
            raise ConfigError(f"optimizer.weight_decay must be 0 or more, got {self.weight_decay}.")
        if not all(0 <= beta < 1 for beta in self.betas):
            raise ConfigError(f"optimizer.betas must both be in [0, 1), got {list(self.betas)}.")
        if not self.momentum >= 0:
            raise ConfigError(f"optimizer.momentum must be 0 or more, got {self.momentum}.")

    def build(self, parameters: Iterable[Any]) -> torch.optim.Optimizer:
        if self.name == "sgd":
            return torch.optim.SGD(parameters, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay,
                                   nesterov=self.momentum > 0)
        return torch.optim.AdamW(parameters, lr=self.lr, weight_decay=self.weight_decay, betas=self.betas)
