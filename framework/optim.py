"""The optimizer section every recipe shares: AdamW or SGD with Nesterov momentum.

`build(model)` splits the parameters into two groups: weight decay for weights with 2 or more dimensions, none for
1-D parameters (norm scales and shifts, biases) and, optionally, embeddings; as timm's `param_groups_weight_decay`
and the HF Trainer do. Decaying a norm's scale or a bias only pulls it towards 0 (a norm's scale should stay near 1).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.optim import lr_scheduler

from framework.errors import ConfigError
from framework.nn.sharded import full_shape


def weight_decay_groups(parameters: nn.Module | Iterable[torch.Tensor], weight_decay: float,
                        no_decay_norm_and_bias: bool = True, no_decay_embeddings: bool = False) -> list[dict[str, Any]]:
    """Optimizer parameter groups: `weight_decay` for the parameters that decay, 0 for the rest (empty groups left
    out). `parameters` is the model (needed for `no_decay_embeddings`) or its parameters."""
    if isinstance(parameters, nn.Module):
        embeddings = {id(m.weight) for m in parameters.modules() if isinstance(m, nn.Embedding)}
        parameters = parameters.parameters()
    elif no_decay_embeddings:
        raise ConfigError("optimizer.no_decay_embeddings needs the model to find its embeddings: call "
                          "OptimizerConfig.build(model), not build(model.parameters()).")
    else:
        embeddings = set()
    decay, no_decay, seen = [], [], set()
    for parameter in parameters:
        if id(parameter) in seen:  # tied weights appear once
            continue
        seen.add(id(parameter))
        vector = len(full_shape(parameter)) <= 1  # a norm's scale or a bias
        undecayed = weight_decay > 0 and (  # with no weight decay at all, one group in the model's order
            (no_decay_norm_and_bias and vector) or (no_decay_embeddings and id(parameter) in embeddings))
        (no_decay if undecayed else decay).append(parameter)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


@dataclass
class OptimizerConfig:
    """Optimizer: AdamW (or SGD with Nesterov momentum), its peak LR and weight decay."""

    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = 0.01
    """Peak learning rate."""
    weight_decay: float = 0.05
    """Weight decay of weights with 2 or more dimensions (see no_decay_norm_and_bias, no_decay_embeddings)."""
    no_decay_norm_and_bias: bool = True
    """No weight decay on 1-D parameters: norm scales and shifts, biases (as timm and the HF Trainer); false: decay
    every parameter."""
    no_decay_embeddings: bool = False
    """No weight decay on nn.Embedding weights either."""
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

    def build(self, model: nn.Module | Iterable[torch.Tensor]) -> torch.optim.Optimizer:
        """The optimizer for `model` (or its parameters), its parameters grouped by weight decay."""
        groups = weight_decay_groups(model, self.weight_decay, self.no_decay_norm_and_bias, self.no_decay_embeddings)
        if self.name == "sgd":
            return torch.optim.SGD(groups, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay,
                                   nesterov=self.momentum > 0)
        return torch.optim.AdamW(groups, lr=self.lr, weight_decay=self.weight_decay, betas=self.betas)


#: Optimizer group keys that hold learning rates (torch's schedulers keep some of them in the groups).
LR_KEYS = ("lr", "initial_lr", "max_lr", "min_lr")


def scale_learning_rates_(optimizer: torch.optim.Optimizer, schedulers: Iterable[Any], factor: float) -> None:
    """Multiply every learning rate by `factor` for the rest of the run: the optimizer's groups and the schedulers'
    base LRs (torch's schedulers compute later LRs from one or the other)."""
    for group in optimizer.param_groups:
        for key in LR_KEYS:
            if key in group:
                group[key] *= factor
    for scheduler in schedulers:
        for inner in [scheduler, *getattr(scheduler, "_schedulers", [])]:  # SequentialLR holds warmup + main
            if hasattr(inner, "base_lrs"):
                inner.base_lrs = [lr * factor for lr in inner.base_lrs]
            if isinstance(inner, lr_scheduler.LRScheduler):
                inner._last_lr = [group["lr"] for group in optimizer.param_groups]
