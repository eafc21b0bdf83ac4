"""Early stopping: end training when a validation metric has not improved for `patience` evaluations.

Hook: `epoch_end` (after the epoch's validation). Rank 0 decides and broadcasts, so every rank stops at the same
epoch even if float rounding differed between them. State (best value, evaluations without improvement) is
checkpointed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

import torch
from accelerate.utils import broadcast

from framework.errors import ConfigError
from framework.state import TrainState
from framework.technique import Technique, register


def improved(value: float, best: float, mode: str, min_delta: float) -> bool:
    """True if `value` beats `best` by more than `min_delta` in direction `mode` ("min" or "max")."""
    return value < best - min_delta if mode == "min" else value > best + min_delta


@register("early_stopping")
class EarlyStopping(Technique):
    """Stop when `metric` has not improved by more than `min_delta` for `patience` consecutive evaluations."""

    def __init__(self, metric: str = "val/loss", mode: Literal["min", "max"] = "min", patience: int = 3,
                 min_delta: float = 0.0):
        if patience < 1:
            raise ConfigError(f"early_stopping.patience must be at least 1, got {patience}.")
        self.metric, self.mode, self.patience, self.min_delta = metric, mode, patience, min_delta
        self.best = math.inf if mode == "min" else -math.inf
        self.evaluations_without_improvement = 0
        self.stopped_at_epoch: int | None = None

    def fit_start(self, state: TrainState) -> None:
        if not state.validates:
            raise ConfigError(f"early_stopping watches the validation metric {self.metric!r}, but this run has no "
                              "validation data (or eval_every is 0).")

    def epoch_end(self, state: TrainState) -> None:
        if state.eval_step != state.step:  # no validation at the end of this epoch (eval_every > 1)
            return
        if self.metric not in state.eval_metrics:
            raise ConfigError(f"early_stopping.metric {self.metric!r} is not among the validation metrics "
                              f"{sorted(state.eval_metrics)}.")
        value = state.eval_metrics[self.metric]
        if improved(value, self.best, self.mode, self.min_delta):
            self.best, self.evaluations_without_improvement = value, 0
        else:
            self.evaluations_without_improvement += 1
        stop = torch.tensor([float(self.evaluations_without_improvement >= self.patience)],
                            device=state.accelerator.device)
        if broadcast(stop, from_process=0).item():  # one decision for all ranks
            state.should_stop = True
            self.stopped_at_epoch = state.epoch

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "evaluations_without_improvement": self.evaluations_without_improvement}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self.best = float(state_dict["best"])
        self.evaluations_without_improvement = int(state_dict["evaluations_without_improvement"])
