"""Early stopping: end training when a validation metric has not improved for `patience` evaluations.

Hook: `epoch_end` (after the epoch's validation). Rank 0 decides and broadcasts, so every rank stops at the same
epoch even if float rounding differed between them. State (best value, evaluations without improvement) is
checkpointed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

from framework.backend import main_process_decides
from framework.errors import require
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
        require(patience >= 1, f"early_stopping.patience must be at least 1, got {patience}.")
        self.metric, self.mode, self.patience, self.min_delta = metric, mode, patience, min_delta
        self.best = math.inf if mode == "min" else -math.inf
        self.evaluations_without_improvement = 0
        self.stopped_at_epoch: int | None = None

    def fit_start(self, state: TrainState) -> None:
        state.require_validation(self.name, self.metric)

    def epoch_end(self, state: TrainState) -> None:
        if not state.validated_now:  # no validation at the end of this epoch (eval_every > 1)
            return
        value = state.validation_metric(self.name, self.metric)
        if improved(value, self.best, self.mode, self.min_delta):
            self.best, self.evaluations_without_improvement = value, 0
        else:
            self.evaluations_without_improvement += 1
        if main_process_decides(state.accelerator, self.evaluations_without_improvement >= self.patience):
            state.should_stop = True
            self.stopped_at_epoch = state.epoch

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "evaluations_without_improvement": self.evaluations_without_improvement}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self.best = float(state_dict["best"])
        self.evaluations_without_improvement = int(state_dict["evaluations_without_improvement"])
