"""NaN / inf guard: a non-finite loss or gradient norm on any rank skips the optimizer step on every rank (weights
and optimizer state unchanged; the batch is consumed), counted and logged as `nan_guard/skipped`. After
`max_consecutive` skips in a row the run rolls back to its newest complete checkpoint and multiplies every learning
rate by `lr_factor` for the rest of the run; after `max_rollbacks` rollbacks it stops with a report (the layer that
first went non-finite, found by replaying the batch).

Hooks: `fit_start`, `on_loss`, `before_optimizer_step`. Costs one host read per optimizer step (the agreed flag),
like fp16's GradScaler. Under fp16 the scaler already skips overflowing steps; the guard adds the rollback.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from framework.checkpoint import load_checkpoint, newest_healthy_checkpoint
from framework.errors import ConfigError
from framework.optim import scale_learning_rates_
from framework.state import TrainState
from framework.technique import Backend, IncompatibleError, Technique, register

#: Optimizer-group entries that hold a learning rate (OneCycleLR keeps its peak and ends in the group).


def nonfinite(tensors: Iterable[torch.Tensor | None]) -> torch.Tensor:
    """A 0-dim bool tensor: does any of `tensors` (a loss, the gradients) hold an inf or NaN. One fused norm pass,
    no host sync."""
    present = [t.detach() for t in tensors if t is not None]
    if not present:
        return torch.zeros((), dtype=torch.bool)
    norms = torch.stack([n.float() for n in torch._foreach_norm(present)])
    return ~torch.isfinite(norms).all()


@register("nan_guard")
class NaNGuard(Technique):
    """Skip non-finite steps on all ranks; roll back and lower the LR when they persist; stop with a report.

    Args:
        max_consecutive: skipped steps in a row that trigger a rollback to the newest complete checkpoint.
        lr_factor: every learning rate is multiplied by this at each rollback.
        max_rollbacks: the run stops (with the doctor's localisation) at the rollback after this many.
    """

    def __init__(self, max_consecutive: int = 3, lr_factor: float = 0.5, max_rollbacks: int = 2):
        if max_consecutive < 1 or max_rollbacks < 0 or not 0 < lr_factor <= 1:
            raise ConfigError("nan_guard: max_consecutive must be >= 1, max_rollbacks >= 0 and lr_factor in (0, 1] "
                              f"(got {max_consecutive}, {max_rollbacks}, {lr_factor}).")
        self.max_consecutive, self.lr_factor, self.max_rollbacks = max_consecutive, lr_factor, max_rollbacks
        self.skipped = self.consecutive = self.rollbacks = 0
        self._loss_bad: torch.Tensor | None = None
        self._batch: Any = None

    def check(self, backend: Backend, others: list[Technique]) -> None:
        if backend.distributed_type == "DEEPSPEED":
            raise IncompatibleError(
                "nan_guard skips the optimizer step, but the DeepSpeed engine steps inside backward (its fp16 loss "
                "scaler skips overflowing steps itself). Remove nan_guard or use a DDP launch config.")

    def fit_start(self, state: TrainState) -> None:
        state.summary["nan_guard"] = {"skipped": self.skipped, "rollbacks": self.rollbacks}

    def on_loss(self, state: TrainState, loss: torch.Tensor, batch: Any, outputs: Any) -> torch.Tensor:
        bad = nonfinite([loss])
        self._loss_bad = bad if self._loss_bad is None else self._loss_bad | bad  # over accumulated micro-batches
        self._batch = batch
        return loss

    def before_optimizer_step(self, state: TrainState) -> None:
        bad = nonfinite(p.grad for p in state.model.parameters()).to(self._loss_bad.device) | self._loss_bad
        self._loss_bad = None
        if not state.accelerator.reduce(bad.float(), reduction="sum").item():  # all ranks agree: one host read
            self.consecutive = 0
            return
        state.skip_step = True
        self.skipped += 1
        self.consecutive += 1
        state.log(**{"nan_guard/skipped": self.skipped})
        if self.consecutive >= self.max_consecutive:
            self._roll_back(state)
        state.summary["nan_guard"] = {"skipped": self.skipped, "rollbacks": self.rollbacks}

    def _roll_back(self, state: TrainState) -> None:
        checkpoint = newest_healthy_checkpoint(state.output_dir)  # intact, with finite weights where there is one
        if self.rollbacks >= self.max_rollbacks or checkpoint is None:
            self._stop(state, "no checkpoint to roll back to" if checkpoint is None
                       else f"{self.rollbacks} rollback(s) did not help")
        counters = (self.skipped, self.rollbacks + 1)
        registered = [state, *[t for t in state.techniques if t.has_state]]
        load_checkpoint(state.accelerator, checkpoint, state.model, registered)  # every rank: they agreed
        self.skipped, self.rollbacks = counters  # the guard's own counts outlive the rollback
        self.consecutive = 0
        schedulers = [s for t in state.techniques for s in t.lr_schedulers()]
        scale_learning_rates_(state.optimizer, schedulers, self.lr_factor)
        state.rolled_back = True
        state.log(**{"nan_guard/rollbacks": self.rollbacks})
        if state.accelerator.is_main_process:
            print(f"nan_guard: {self.max_consecutive} non-finite steps in a row; rolled back to {checkpoint.name} "
                  f"(step {state.step}) with every learning rate x{self.lr_factor} (rollback {self.rollbacks}).")

    def _stop(self, state: TrainState, why: str) -> None:
        from framework.techniques.doctor import NonFiniteLossError, first_nonfinite_layer

        model, task, batch = state.model, state.task, self._batch
        layer = first_nonfinite_layer(model, lambda: task.forward(model, batch)) if task and batch is not None else None
        where = f" The first non-finite output comes from {layer}." if layer else ""
        raise NonFiniteLossError(
            f"nan_guard: {self.max_consecutive} non-finite steps in a row at step {state.step} and {why}.{where} Fix: "
            "lower the learning rate, add gradient_clipping, check the data for inf/NaN, or use bf16 instead of fp16.")

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped, "rollbacks": self.rollbacks}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped, self.rollbacks = int(state_dict["skipped"]), int(state_dict["rollbacks"])
