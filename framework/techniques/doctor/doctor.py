"""`Doctor`, the technique: its hooks collect losses and gradient norms on the device, read them in one host sync
every `check_every` steps, and report what the pure checks of findings.py find. The package docstring
(framework/techniques/doctor/__init__.py) lists every finding, its threshold and what it costs.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

import torch
from accelerate.utils import DistributedType
from tqdm.auto import tqdm

from framework.diagnosis import first_nonfinite_layer, nonfinite_parameters
from framework.errors import NonFiniteLossError, require, require_int
from framework.state import TrainState
from framework.technique import Technique, register
from framework.techniques.doctor.findings import (
    BASELINE_STEPS,
    Finding,
    _names,
    expected_initial_loss,
    exploding_gradient_finding,
    frozen_modules,
    initial_loss_finding,
    layer_gradient_norms,
    missing_gradient_finding,
    nonfinite_loss_finding,
    overfitting_finding,
    plateau_finding,
    unoptimized_finding,
    vanishing_gradient_finding,
    vanishing_layers,
)


# --- the technique ---------------------------------------------------------------------------------------------------
@register("doctor")
class Doctor(Technique):
    """Watch a run for the common ways training goes wrong; print each finding once with its evidence and fix.

    Hooks: fit_start, on_loss, after_backward, before_optimizer_step, after_optimizer_step, epoch_end, fit_end. See
    the package docstring for every finding, its threshold and what it costs.

    Args:
        check_every: optimizer steps between reads of the device-side flags and gradient norms (one host sync each;
            1 catches a NaN on the very batch that produced it).
        initial_loss: check the first loss against ln(classes).
        initial_loss_tolerance: "far" means off by more than this fraction of ln C (and by more than 1 nat).
        explode_factor: a total gradient norm this many times the median of the first 5 steps is exploding.
        vanish_ratio: a layer whose gradient norm is below this fraction of the median layer's is vanishing.
        plateau_window: optimizer steps per loss-plateau check (0: off).
        min_decrease: the relative fall the loss must show over a window.
        overfit_patience: evaluations the validation loss must stay above its best (0: off).
        overfit_min_rise: how far above its best (relative; and at least 0.05 nats) the validation loss must be.
        stop_on_nonfinite: raise `NonFiniteLossError` on a NaN/inf loss (False: report and go on).
    """

    def __init__(self, check_every: int = 50, initial_loss: bool = True, initial_loss_tolerance: float = 0.5,
                 explode_factor: float = 100.0, vanish_ratio: float = 1e-6, plateau_window: int = 100,
                 min_decrease: float = 0.01, overfit_patience: int = 3, overfit_min_rise: float = 0.05,
                 stop_on_nonfinite: bool = True):
        for name, value, low in (("check_every", check_every, 1), ("plateau_window", plateau_window, 0),
                                 ("overfit_patience", overfit_patience, 0)):
            require_int(f"doctor.{name}", value, low)
        for name, value in (("initial_loss_tolerance", initial_loss_tolerance), ("explode_factor", explode_factor),
                            ("vanish_ratio", vanish_ratio), ("min_decrease", min_decrease),
                            ("overfit_min_rise", overfit_min_rise)):
            require(value > 0, f"doctor.{name} must be positive, got {value!r}.")
        require(plateau_window != 1, "doctor.plateau_window must be 0 (off) or at least 2 (it compares two halves).")
        self.check_every, self.initial_loss, self.initial_loss_tolerance = check_every, initial_loss, \
            initial_loss_tolerance
        self.explode_factor, self.vanish_ratio = explode_factor, vanish_ratio
        self.plateau_window, self.min_decrease = plateau_window, min_decrease
        self.overfit_patience, self.overfit_min_rise = overfit_patience, overfit_min_rise
        self.stop_on_nonfinite = stop_on_nonfinite
        self._reset()

    def _reset(self) -> None:
        self.findings: list[dict[str, Any]] = []  # {code, step, message, fix}, in the order found
        self._started = False  # on_loss has run once
        self._backward_checked = False
        self._batch: Any = None  # the latest batch (replayed on a non-finite loss)
        self._nonfinite: torch.Tensor | None = None  # device flag: some loss since the last read was NaN/inf
        self._origin: int | None = None  # state.step when training (re)started: set on first use, after a restore
        self._read_step = 0  # the step of the last read of that flag
        self._chance: float | None = None  # ln C, when known
        self._grad_step = -1
        self._named_grads: list[tuple[str, torch.Tensor]] = []
        self._max_norm: torch.Tensor | None = None  # largest total gradient norm since the last gradient check
        self._max_since = 0
        self._early_norms: list[torch.Tensor] = []
        self._baseline: float | None = None
        self._vanishing_before: tuple[int, set[str]] = (-1, set())
        self._window: list[torch.Tensor] = []  # losses of the current plateau window
        self._window_start = 0
        self._first_half_mean: float | None = None
        self._first_half_name = ""
        self._epoch_loss: torch.Tensor | float = 0.0  # training loss summed since the last evaluation
        self._epoch_batches = 0
        self._train_history: list[float] = []
        self._val_history: list[float] = []

    # --- reporting ---------------------------------------------------------------------------------------------
    def report(self, state: TrainState, finding: Finding | None) -> bool:
        """Print, log and record `finding` unless a finding with its code was reported already; True if new."""
        if finding is None or any(f["code"] == finding.code for f in self.findings):
            return False
        self.findings.append({"code": finding.code, "step": state.step, "message": finding.message,
                              "fix": finding.fix})
        if state.accelerator.is_main_process:
            tqdm.write(finding.format(state.step))  # keeps the progress bar intact
        # Straight to the trackers (main process only, no sync): a finding at fit_end has no later log line.
        state.accelerator.log({f"doctor/{finding.code}": 1}, step=state.step)
        return True

    # --- hooks -------------------------------------------------------------------------------------------------
    def fit_start(self, state: TrainState) -> None:
        self._reset()
        state.summary["doctor"] = self.findings  # the same list: summary.json shows everything found
        accelerator = state.accelerator
        self._model = accelerator.unwrap_model(state.model, keep_torch_compile=False)
        self._parameters = [(n, p) for n, p in self._model.named_parameters() if p.requires_grad]
        # DeepSpeed and FSDP keep reduced gradients in their own (sharded) buffers, not in param.grad.
        self._gradients_visible = accelerator.distributed_type not in (DistributedType.DEEPSPEED,
                                                                      DistributedType.FSDP)
        self._scaled = accelerator.scaler is not None  # fp16: overflowing steps are normal, the scaler skips them
        # Nothing here may read state.step: on resume the loop restores it from the checkpoint after fit_start.

    def _begin(self, state: TrainState) -> None:
        """The first training hook of this fit (state.step restored by now, on resume): where the step counters
        start. A resumed run's first window has no reference of the run's first losses (not checkpointed)."""
        self._origin = state.step
        self._read_step = self._window_start = self._max_since = state.step

    def on_loss(self, state: TrainState, loss: torch.Tensor, batch: Any, outputs: Any) -> torch.Tensor:
        if self._origin is None:
            self._begin(state)
        if batch is self._batch:  # the same batch again (SAM's second pass): counted once
            return loss
        self._batch = batch
        value = loss.detach().float()
        bad = ~torch.isfinite(value)
        self._nonfinite = bad if self._nonfinite is None else self._nonfinite | bad
        if self.plateau_window:
            self._window.append(value)
        if self.overfit_patience:
            self._epoch_loss = self._epoch_loss + value
            self._epoch_batches += 1
        first = not self._started
        if first:
            self._started = True
            self._first_loss(state, value, outputs)
        if first or (state.step % self.check_every == 0 and state.step != self._read_step):
            self._read_nonfinite(state)
        return loss

    def _first_loss(self, state: TrainState, loss: torch.Tensor, outputs: Any) -> None:
        """Step 0 of a fresh run: the initial loss against ln C (one host sync, once)."""
        self._chance = expected_initial_loss(state.task, outputs)
        if not self.initial_loss or state.step > 0 or self._chance is None:
            return
        spread = isinstance(outputs, torch.Tensor) and outputs.is_floating_point() and outputs.numel() > 1
        values = torch.stack([loss, outputs.detach().float().std()] if spread else [loss]).tolist()
        self.report(state, initial_loss_finding(values[0], self._chance, self.initial_loss_tolerance,
                                                logits_std=values[1] if spread else None))

    def _read_nonfinite(self, state: TrainState) -> None:
        """Read the non-finite flag (summed over ranks: they all reach this at the same step) and act on it."""
        if self._nonfinite is None:
            return
        steps = (self._read_step, state.step)
        self._read_step = state.step
        count = state.accelerator.reduce(self._nonfinite.float(), reduction="sum").item()
        self._nonfinite = None
        if count == 0:
            return
        layer = None
        if self._batch is not None and state.task is not None:
            model, batch = self._model, self._batch
            try:
                with state.accelerator.autocast():
                    layer = first_nonfinite_layer(model, lambda: state.task.forward(model, batch))
            except Exception as error:  # a replay that fails must not hide the finding
                tqdm.write(f"doctor: replaying the batch failed ({error}); reporting without the layer.")
        self._read_gradient_max(state)  # gradients that overflowed first are the better clue: reported before
        finding = nonfinite_loss_finding(layer, self._batch, steps, self.check_every,
                                         nonfinite_parameters(self._model))
        self.report(state, finding)
        if self.stop_on_nonfinite and not any(t.handles_nonfinite for t in state.techniques):  # one recovers
            raise NonFiniteLossError(f"training stopped: {finding.message} Fix: {finding.fix} (To keep training "
                                     "anyway: --techniques.doctor.stop_on_nonfinite false.)")

    def after_backward(self, state: TrainState) -> None:
        if self._backward_checked:
            return
        self._backward_checked = True
        frozen = frozen_modules(self._model)
        if frozen and state.accelerator.is_main_process:  # a note, not a finding: freezing is often on purpose
            tqdm.write(f"doctor: note: frozen (requires_grad=False), not trained: {_names(frozen)}.")
        # A task that owns its step (a GAN) updates one part of the model at a time: the others rightly get none.
        if self._gradients_visible and not getattr(state.task, "owns_step", False):
            self.report(state, missing_gradient_finding(self._parameters))
            self.report(state, unoptimized_finding(self._parameters, state.optimizer))

    def before_optimizer_step(self, state: TrainState) -> None:
        if self._origin is None:
            self._begin(state)
        if not self._gradients_visible or self._grad_step == state.step:  # SAM calls this twice per step
            return
        self._grad_step = state.step
        named = [(n, p.grad) for n, p in self._parameters if p.grad is not None and not p.grad.is_sparse]
        self._named_grads = named
        if not named:
            return
        # Device work only on ordinary steps: per-parameter norms, the total, and its running max.
        norms = torch.stack([n.float() for n in torch._foreach_norm([g for _, g in named])])
        total = torch.linalg.vector_norm(norms)
        if self._scaled:
            total = torch.where(torch.isfinite(total), total, torch.zeros_like(total))
        self._max_norm = total if self._max_norm is None else torch.maximum(self._max_norm, total)
        if len(self._early_norms) < BASELINE_STEPS:
            self._early_norms.append(total)
        if state.step % self.check_every:
            return
        named_norms = dict(zip((n for n, _ in named), self._read_gradient_max(state, norms)))
        if state.step > 0:  # at step 0 a zero-initialised residual branch rightly gets 0 gradient
            layers = layer_gradient_norms(named_norms)
            now = vanishing_layers(layers, self.vanish_ratio)
            before_step, before = self._vanishing_before
            persistent = {name: norm for name, norm in now.items() if name in before}
            self.report(state, vanishing_gradient_finding(persistent, layers, self.vanish_ratio,
                                                          (before_step, state.step)))
            self._vanishing_before = (state.step, set(now))

    def _read_gradient_max(self, state: TrainState, norms: torch.Tensor | None = None) -> list[float]:
        """Read (one host sync) the largest total gradient norm since the last read, the first steps' norms until
        the baseline is set, and `norms` (this step's per-parameter norms, returned); report exploding gradients."""
        if self._max_norm is None:
            return norms.tolist() if norms is not None else []
        early = self._baseline is None and len(self._early_norms) == BASELINE_STEPS
        pieces = [self._max_norm.reshape(1), *([torch.stack(self._early_norms)] if early else []),
                  *([norms] if norms is not None else [])]
        values = torch.cat(pieces).tolist()
        max_norm, values = values[0], values[1:]
        if early:
            finite = [v for v in values[:BASELINE_STEPS] if math.isfinite(v) and v > 0]
            self._baseline = statistics.median(finite) if finite else None
            values = values[BASELINE_STEPS:]
        steps = (self._max_since, self._grad_step)
        self._max_norm, self._max_since = None, self._grad_step + 1
        nonfinite = [n for (n, _), v in zip(self._named_grads, values) if not math.isfinite(v)] if norms is not None \
            else []
        self.report(state, exploding_gradient_finding(max_norm, self._baseline, self.explode_factor, steps, nonfinite))
        return values

    def after_optimizer_step(self, state: TrainState) -> None:
        if self._origin is None:
            self._begin(state)
        if not self.plateau_window or state.step - self._window_start < self.plateau_window:
            return
        losses = torch.stack(self._window).tolist() if self._window else []  # one host sync per window
        steps = (self._window_start, state.step - 1)
        self._window, self._window_start = [], state.step
        if len(losses) < 2 or not all(math.isfinite(v) for v in losses):
            return  # non-finite losses are the non-finite check's
        if self._first_half_mean is None and self._origin == 0:  # every window's reference: the run's first losses
            self._first_half_mean = statistics.fmean(losses[: len(losses) // 2])
            self._first_half_name = f"the run's first {len(losses) // 2} losses"
        # A resumed run (its first losses are not in the checkpoint) compares with chance level only: a late window
        # of a converging run is no reference (its loss may rightly fall < 1% more), and a loss stuck at chance is
        # still caught.
        candidates = [(self._first_half_mean, self._first_half_name)] if self._first_half_mean is not None else []
        if self._chance is not None:
            candidates.append((self._chance, f"chance level, ln({round(math.exp(self._chance))})"))
        if not candidates:
            return
        reference, name = min(candidates, key=lambda candidate: candidate[0])
        self.report(state, plateau_finding(losses, self.min_decrease, reference, steps, name))

    def epoch_end(self, state: TrainState) -> None:
        if not self.overfit_patience or not state.validated_now or "val/loss" not in state.eval_metrics \
                or not self._epoch_batches:
            return
        train = float(self._epoch_loss / self._epoch_batches)  # one host sync per evaluation
        self._epoch_loss, self._epoch_batches = 0.0, 0
        self._train_history.append(train)
        self._val_history.append(float(state.eval_metrics["val/loss"]))
        self.report(state, overfitting_finding(self._train_history, self._val_history, self.overfit_patience,
                                               self.overfit_min_rise))

    def fit_end(self, state: TrainState) -> None:
        self._read_nonfinite(state)  # the steps since the last read (every rank reaches fit_end)
        if state.accelerator.is_main_process:
            codes = [f["code"] for f in self.findings]
            tqdm.write("doctor: no findings" if not codes else
                       f"doctor: {len(codes)} finding(s): {', '.join(codes)} (see summary.json, \"doctor\")")
