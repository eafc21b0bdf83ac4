"""NaN / inf guard: a non-finite loss or gradient norm on any rank skips the optimizer step on every rank (weights
and optimizer state unchanged; the batch is consumed), counted and logged as `nan_guard/skipped`. After
`max_consecutive` skips in a row the run rolls back to its newest complete checkpoint and multiplies every learning
rate by `lr_factor` for the rest of the run; after `max_rollbacks` rollbacks it stops with a report (the layer that
first went non-finite, found by replaying the batch).

With `spike_threshold: k` it also guards against loss spikes (Lightning's SpikeDetection only detects them): a step
whose loss (mean over ranks) is more than k robust standard deviations (1.4826 × the median absolute deviation) above
the median of the last `spike_window` steps is skipped the same way, on every rank, counted as `nan_guard/spikes`;
spikes in a row count toward `max_consecutive` and roll back likewise. The message names the batch (epoch and
micro-batch, and its sample indices when the batch carries an `index` / `idx` entry).

Hooks: `fit_start`, `on_loss`, `before_optimizer_step`. Costs one host read per optimizer step (the agreed flag and
loss), like fp16's GradScaler. Under fp16 the scaler already skips overflowing steps; the guard adds the rollback.
"""

from __future__ import annotations

import statistics
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from framework.backend import Backend
from framework.checkpoint import newest_healthy_checkpoint
from framework.diagnosis import first_nonfinite_layer
from framework.errors import IncompatibleError, NonFiniteLossError, require
from framework.state import TrainState
from framework.technique import Technique, register


def nonfinite(tensors: Iterable[torch.Tensor | None]) -> torch.Tensor:
    """A 0-dim bool tensor: does any of `tensors` (a loss, the gradients) hold an inf or NaN. One fused norm pass,
    no host sync."""
    present = [t.detach() for t in tensors if t is not None]
    if not present:
        return torch.zeros((), dtype=torch.bool)
    norms = torch.stack([n.float() for n in torch._foreach_norm(present)])
    return ~torch.isfinite(norms).all()


def is_spike(loss: float, window: Sequence[float], k: float, min_window: int = 8) -> bool:
    """Is `loss` more than `k` robust standard deviations (1.4826 × MAD, the normal-consistent scale) above the
    median of `window`? False until the window holds `min_window` losses."""
    if len(window) < min_window:
        return False
    median = statistics.median(window)
    mad = statistics.median(abs(x - median) for x in window)
    return loss > median + k * 1.4826 * max(mad, 1e-12 * abs(median))


@register("nan_guard")
class NaNGuard(Technique):
    """Skip non-finite steps on all ranks; roll back and lower the LR when they persist; stop with a report.

    Args:
        max_consecutive: skipped steps in a row that trigger a rollback to the newest complete checkpoint.
        lr_factor: every learning rate is multiplied by this at each rollback.
        max_rollbacks: the run stops (with the doctor's localisation) at the rollback after this many.
        spike_threshold: k: also skip steps whose loss is more than k robust standard deviations above the median of
            the last `spike_window` steps (e.g. 6); null: NaN/inf only.
        spike_window: steps whose losses the spike test compares against.
    """

    handles_nonfinite = True  # it skips and rolls back: a technique that would stop the run on one leaves it to this

    def __init__(self, max_consecutive: int = 3, lr_factor: float = 0.5, max_rollbacks: int = 2,
                 spike_threshold: float | None = None, spike_window: int = 50):
        require(max_consecutive >= 1 and max_rollbacks >= 0 and 0 < lr_factor <= 1,
                "nan_guard: max_consecutive must be >= 1, max_rollbacks >= 0 and lr_factor in (0, 1] "
                f"(got {max_consecutive}, {max_rollbacks}, {lr_factor}).")
        require((spike_threshold is None or spike_threshold > 0) and spike_window >= 2,
                f"nan_guard: spike_threshold must be positive (or null) and spike_window at least 2 "
                f"(got {spike_threshold}, {spike_window}).")
        self.max_consecutive, self.lr_factor, self.max_rollbacks = max_consecutive, lr_factor, max_rollbacks
        self.spike_threshold, self.spike_window = spike_threshold, spike_window
        self.skipped = self.consecutive = self.rollbacks = self.spikes = 0
        self.recent_losses: deque[float] = deque(maxlen=spike_window)
        self._loss_bad: torch.Tensor | None = None
        self._loss_sum: torch.Tensor | None = None
        self._micro_batches = 0
        self._batch: Any = None

    def check(self, backend: Backend, others: list[Technique]) -> None:
        if backend.distributed_type == "DEEPSPEED":
            raise IncompatibleError(
                "nan_guard skips the optimizer step, but the DeepSpeed engine steps inside backward (its fp16 loss "
                "scaler skips overflowing steps itself). Remove nan_guard or use a DDP launch config.")

    def fit_start(self, state: TrainState) -> None:
        self._report(state)

    def _report(self, state: TrainState) -> None:
        state.summary["nan_guard"] = {"skipped": self.skipped, "rollbacks": self.rollbacks, "spikes": self.spikes}

    def on_loss(self, state: TrainState, loss: torch.Tensor, batch: Any, outputs: Any) -> torch.Tensor:
        bad = nonfinite([loss])
        self._loss_bad = bad if self._loss_bad is None else self._loss_bad | bad  # over accumulated micro-batches
        if self.spike_threshold is not None:
            value = loss.detach().float()
            self._loss_sum = value if self._loss_sum is None else self._loss_sum + value
            self._micro_batches += 1
        self._batch = batch
        return loss

    def before_optimizer_step(self, state: TrainState) -> None:
        bad = nonfinite(p.grad for p in state.model.parameters()).to(self._loss_bad.device) | self._loss_bad
        flags = [bad.float()]
        if self.spike_threshold is not None:  # the step's mean loss rides along in the same reduction
            flags.append(self._loss_sum.to(bad.device) / self._micro_batches)
        self._loss_bad, self._loss_sum, self._micro_batches = None, None, 0
        # All ranks agree on the same sums: one host read.
        agreed = state.accelerator.reduce(torch.stack(flags), reduction="sum").tolist()
        nonfinite_step = agreed[0] > 0
        spike = False
        if not nonfinite_step and self.spike_threshold is not None:
            loss = agreed[1] / state.accelerator.num_processes
            spike = is_spike(loss, self.recent_losses, self.spike_threshold, min_window=min(8, self.spike_window))
            if spike:
                self._tell_spike(state, loss)
            else:
                self.recent_losses.append(loss)
        if not (nonfinite_step or spike):
            self.consecutive = 0
            return
        state.skip_step = True
        self.skipped += 1
        self.spikes += spike
        self.consecutive += 1
        state.log(**{"nan_guard/skipped": self.skipped, "nan_guard/spikes": self.spikes})
        if self.consecutive >= self.max_consecutive:
            self._roll_back(state)
        self._report(state)

    def _tell_spike(self, state: TrainState, loss: float) -> None:
        if not state.accelerator.is_main_process:
            return
        median = statistics.median(self.recent_losses)
        batch = self._batch
        indices = next((batch[key] for key in ("index", "idx") if isinstance(batch, dict) and key in batch), None)
        samples = f", samples {indices.tolist() if torch.is_tensor(indices) else indices}" if indices is not None else ""
        print(f"nan_guard: loss spike at step {state.step + 1} ({loss:.4g} against a median of {median:.4g} over the "
              f"last {len(self.recent_losses)} steps): step skipped on every rank; batch: epoch {state.epoch + 1}, "
              f"micro-batch {state.batch_in_epoch + 1} of the epoch{samples}.")

    def _roll_back(self, state: TrainState) -> None:
        checkpoint = newest_healthy_checkpoint(state.output_dir)  # intact, with finite weights where there is one
        if self.rollbacks >= self.max_rollbacks or checkpoint is None:
            self._stop(state, "no checkpoint to roll back to" if checkpoint is None
                       else f"{self.rollbacks} rollback(s) did not help")
        counters = (self.skipped, self.rollbacks + 1, self.spikes)
        state.rollback(to=checkpoint, lr_factor=self.lr_factor)  # every rank: they agreed
        self.skipped, self.rollbacks, self.spikes = counters  # the guard's own counts outlive the rollback
        self.consecutive = 0
        state.log(**{"nan_guard/rollbacks": self.rollbacks})
        if state.accelerator.is_main_process:
            print(f"nan_guard: {self.max_consecutive} skipped steps (non-finite or spikes) in a row; rolled back to {checkpoint.name} "
                  f"(step {state.step}) with every learning rate x{self.lr_factor} (rollback {self.rollbacks}).")

    def _stop(self, state: TrainState, why: str) -> None:
        model, task, batch = state.model, state.task, self._batch
        layer = first_nonfinite_layer(model, lambda: task.forward(model, batch)) if task and batch is not None else None
        where = f" The first non-finite output comes from {layer.name or 'the model'} ({layer.module_type})." \
            if layer else ""
        raise NonFiniteLossError(
            f"nan_guard: {self.max_consecutive} non-finite steps in a row at step {state.step} and {why}.{where} Fix: "
            "lower the learning rate, add gradient_clipping, check the data for inf/NaN, or use bf16 instead of fp16.")

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped, "rollbacks": self.rollbacks, "spikes": self.spikes,
                "recent_losses": list(self.recent_losses)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped, self.rollbacks = int(state_dict["skipped"]), int(state_dict["rollbacks"])
        self.spikes = int(state_dict.get("spikes", 0))
        self.recent_losses = deque(state_dict.get("recent_losses", []), maxlen=self.spike_window)
