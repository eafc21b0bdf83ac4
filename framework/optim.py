"""The optimizer section every recipe shares: AdamW or SGD with Nesterov momentum."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch


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

    def build(self, parameters: Iterable[Any]) -> torch.optim.Optimizer:
        if self.name == "sgd":
            return torch.optim.SGD(parameters, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay,
                                   nesterov=self.momentum > 0)
        return torch.optim.AdamW(parameters, lr=self.lr, weight_decay=self.weight_decay, betas=self.betas)
