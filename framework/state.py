"""TrainState: what every hook receives: the run's objects and its counters."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from framework.errors import ConfigError

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator

#: The counters saved in checkpoints (the objects are saved by accelerate itself).
COUNTERS = ("step", "epoch", "batch_in_epoch", "samples_seen", "tokens_seen")


@dataclass
class TrainState:
    """The run as the techniques see it.

    `model` and `optimizer` are what `accelerator.prepare` returned once `fit_start` runs (in `before_prepare` they
    are still the raw objects and a technique may replace them). Counters count optimizer steps, not micro-batches.
    """

    accelerator: Accelerator
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    output_dir: Path
    steps_per_epoch: int = 0  # optimizer steps in one epoch on this run's world size and accumulation
    max_steps: int = 0  # optimizer steps this run will take in all
    step: int = 0  # optimizer steps done
    epoch: int = 0  # epochs completed
    batch_in_epoch: int = 0  # micro-batches consumed in the current epoch (for mid-epoch resume)
    samples_seen: int = 0  # over all ranks
    tokens_seen: int = 0  # over all ranks (language models)
    flops_per_token: int | None = None  # the model's training FLOPs per token, when known (TFLOP/s and MFU)
    validates: bool = False  # the run evaluates on validation data at epoch ends (schedules/early stopping need it)
    should_stop: bool = False  # set by a technique (early stopping) to end training after this step/epoch
    skip_step: bool = False  # set in before_optimizer_step (nan_guard): this step is not taken, on every rank
    rolled_back: bool = False  # set by `rollback` (a checkpoint loaded mid-run): the loop restarts its epoch
    preempted: bool = False  # a preemption signal stopped the run (after a checkpoint)
    techniques: list = field(default_factory=list)  # the run's techniques, in hook order
    task: Any = None  # the run's Task (Mixup / label smoothing read `num_classes` and `target_key` from it)
    train_data: Any = None  # the training DataLoader as prepared (progressive resizing finds its size control)
    logs: dict[str, Any] = field(default_factory=dict)  # values for the next log line; the latest wins (tensors are fine)
    summary: dict[str, Any] = field(default_factory=dict)  # what techniques add to summary.json
    eval_metrics: dict[str, float] = field(default_factory=dict)  # the latest validation's results
    eval_step: int = -1  # the step at which eval_metrics were measured (== step: fresh at this epoch's end)
    # The loop's rollback (Trainer.rollback), offered to the hooks through `rollback`; None outside a Trainer.
    rollback_service: Callable[[Path | None, float], Path | None] | None = field(default=None, repr=False)
    # (provide, consume) pairs registered with `read_with_log_line`; LogWindow.flush serves them.
    log_line_readers: list[tuple[Callable[[], torch.Tensor | None], Callable[[list[list[float]]], None]]] = field(
        default_factory=list, repr=False)

    @property
    def validated_now(self) -> bool:
        """True at an epoch end whose validation has just run (eval_every may skip epochs)."""
        return self.eval_step == self.step

    def require_validation(self, who: str, metric: str) -> None:
        """For techniques driven by a validation metric: refuse, at fit_start, a run that never validates."""
        if not self.validates:
            raise ConfigError(f"{who} watches the validation metric {metric!r}, but this run has no validation data "
                              "(or eval_every is 0). Give it validation data or remove it.")

    def validation_metric(self, who: str, metric: str) -> float:
        """The latest value of a validation metric, or an error that lists the ones there are."""
        if metric not in self.eval_metrics:
            raise ConfigError(f"{who}.metric {metric!r} is not among the validation metrics {sorted(self.eval_metrics)}.")
        return self.eval_metrics[metric]

    def rollback(self, to: Path | None = None, lr_factor: float = 1.0) -> Path | None:
        """Reload checkpoint `to` (default: the newest healthy one) through the loop's own load path and multiply
        every learning rate by `lr_factor` for the rest of the run; the loop then continues from the restored
        position. Every rank must call it alike (in the same hook, e.g. after agreeing on a flag). Returns the
        checkpoint loaded, or None when there is none (nothing changed)."""
        if self.rollback_service is None:
            raise RuntimeError("rollback reloads a checkpoint through the training loop; call it from a hook of "
                               "Trainer.fit")
        return self.rollback_service(to, lr_factor)

    def log(self, **values: Any) -> None:
        """Report values; the loop writes the latest of each at its next log line (tensors: no host sync here)."""
        self.logs.update(values)

    def read_with_log_line(self, provide: Callable[[], torch.Tensor | None],
                           consume: Callable[[list[list[float]]], None]) -> None:
        """Have values read with each training log line, in its one host sync, instead of a sync of one's own.

        Register once (e.g. in fit_start; the same pair again changes nothing). At every log line, on every rank,
        `provide()` returns a flat float tensor on the device (or None: nothing this time); the log line gathers it
        over ranks with its own values and reads everything at once; then `consume(per_rank)` receives those values
        as floats, one list per rank in rank order (`per_rank[state.accelerator.process_index]` is this rank's; a
        count summed over the rows needs no collective of its own). At a given log line `provide` must return as
        many values on every rank (the gather needs equal shapes): let the length depend on the step only, never on
        a rank's data. `consume` runs before the log line is written, so what it logs at an earlier step still
        precedes the line; an exception it raises (a stop) leaves the loop, and that line is not written."""
        if (provide, consume) not in self.log_line_readers:
            self.log_line_readers.append((provide, consume))

    def state_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in COUNTERS}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for name in COUNTERS:
            setattr(self, name, int(state_dict[name]))
