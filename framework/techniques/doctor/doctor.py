"""`Doctor`, the technique: its hooks collect losses and gradient norms on the device and report what the pure
checks of findings.py find in them. The values reach the host inside the log line's one read (default), or in
reads of the doctor's own every `check_every` steps. The package docstring (framework/techniques/doctor/__init__.py)
lists every finding, its threshold and what it costs.
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


#: What the doctor reads: (name, values on the device, context: their steps, the parameters' names).
Piece = tuple[str, torch.Tensor, Any]


# --- the technique ---------------------------------------------------------------------------------------------------
@register("doctor")
class Doctor(Technique):
    """Watch a run for the common ways training goes wrong; print each finding once with its evidence and fix.

    Hooks: fit_start, on_loss, after_backward, before_optimizer_step, after_optimizer_step, epoch_end, fit_end. See
    the package docstring for every finding, its threshold and what it costs.

    Args:
        check_every: None (default): the device-side flags, gradient norms and losses are read with each training
            log line, in its one host sync (`TrainState.read_with_log_line`): no sync of the doctor's own. N: the
            doctor reads them itself every N optimizer steps (one host sync each; 1 catches a NaN on the very
            batch that produced it, before its update).
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

    def __init__(self, check_every: int | None = None, initial_loss: bool = True, initial_loss_tolerance: float = 0.5,
                 explode_factor: float = 100.0, vanish_ratio: float = 1e-6, plateau_window: int = 100,
                 min_decrease: float = 0.01, overfit_patience: int = 3, overfit_min_rise: float = 0.05,
                 stop_on_nonfinite: bool = True):
        for name, value, low in (("check_every", check_every, 1), ("plateau_window", plateau_window, 0),
                                 ("overfit_patience", overfit_patience, 0)):
            if value is not None or name != "check_every":
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

    @property
    def folded(self) -> bool:
        """True when the values are read with the log line (check_every None), not by reads of the doctor's own."""
        return self.check_every is None

    def _reset(self) -> None:
        self.findings: list[dict[str, Any]] = []  # {code, step, message, fix}, in the order found
        self._started = False  # on_loss has run once
        self._backward_checked = False
        self._batch: Any = None  # the latest batch (replayed on a non-finite loss)
        self._nonfinite: torch.Tensor | None = None  # device flag: some loss since the last read was NaN/inf
        self._nonfinite_since = 0  # the step of the first loss that flag covers (folded reads)
        self._loss_step = 0  # the step of the latest loss
        self._origin: int | None = None  # state.step when training (re)started: set on first use, after a restore
        self._read_step = 0  # the step of the last read of that flag (reads of the doctor's own)
        self._chance: float | None = None  # ln C, when known
        self._first: torch.Tensor | None = None  # the first loss (and the logits' std), not read yet (folded)
        self._grad_step = -1
        self._norms: tuple[torch.Tensor, int, list[str]] | None = None  # the latest per-parameter norms, their step
        # and the parameters' names, not read yet (folded)
        self._max_norm: torch.Tensor | None = None  # largest total gradient norm since the last gradient check
        self._max_since = 0
        self._early_norms: list[torch.Tensor] = []
        self._early_taken = False
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
        self._layout: list[tuple[str, int, Any]] = []  # what the latest folded read holds: (piece, length, context)

    # --- reporting ---------------------------------------------------------------------------------------------
    def report(self, state: TrainState, finding: Finding | None, step: int | None = None) -> bool:
        """Print, log and record `finding` (at `step`, default now) unless a finding with its code was reported
        already; True if new."""
        if finding is None or any(f["code"] == finding.code for f in self.findings):
            return False
        step = state.step if step is None else step
        self.findings.append({"code": finding.code, "step": step, "message": finding.message, "fix": finding.fix})
        if state.accelerator.is_main_process:
            tqdm.write(finding.format(step))  # keeps the progress bar intact
        # Straight to the trackers (main process only, no sync): a finding at fit_end has no later log line.
        state.accelerator.log({f"doctor/{finding.code}": 1}, step=step)
        return True

    # --- hooks -------------------------------------------------------------------------------------------------
    def fit_start(self, state: TrainState) -> None:
        self._reset()
        state.summary["doctor"] = self.findings  # the same list: summary.json shows everything found
        accelerator = state.accelerator
        self._state = state
        self._model = accelerator.unwrap_model(state.model, keep_torch_compile=False)
        self._parameters = [(n, p) for n, p in self._model.named_parameters() if p.requires_grad]
        # DeepSpeed and FSDP keep reduced gradients in their own (sharded) buffers, not in param.grad.
        self._gradients_visible = accelerator.distributed_type not in (DistributedType.DEEPSPEED,
                                                                      DistributedType.FSDP)
        self._scaled = accelerator.scaler is not None  # fp16: overflowing steps are normal, the scaler skips them
        if self.folded:
            state.read_with_log_line(self._provide, self._consume)
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
        if self._nonfinite is None:
            self._nonfinite, self._nonfinite_since = bad, state.step
        else:
            self._nonfinite = self._nonfinite | bad
        self._loss_step = state.step
        if self.plateau_window:
            self._window.append(value)
        if self.overfit_patience:
            self._epoch_loss = self._epoch_loss + value
            self._epoch_batches += 1
        first = not self._started
        if first:
            self._started = True
            self._first = self._first_loss(state, value, outputs)
            if not self.folded:
                self._act(state, self._read(self._take_first()))  # a read of its own: once, at step 0
        if not self.folded and (first or (state.step % self.check_every == 0 and state.step != self._read_step)):
            self._read_nonfinite(state)
        return loss

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
        names, grads = [], []  # the names only are kept: a gradient held past zero_grad would keep its memory
        for name, p in self._parameters:
            if p.grad is not None and not p.grad.is_sparse:
                names.append(name)
                grads.append(p.grad)
        if not grads:
            return
        # Device work only on ordinary steps: per-parameter norms, the total, and its running max.
        norms = torch.stack([n.float() for n in torch._foreach_norm(grads)])
        total = torch.linalg.vector_norm(norms)
        if self._scaled:
            total = torch.where(torch.isfinite(total), total, torch.zeros_like(total))
        self._max_norm = total if self._max_norm is None else torch.maximum(self._max_norm, total)
        if len(self._early_norms) < BASELINE_STEPS:
            self._early_norms.append(total)
        if self.folded:
            self._norms = (norms, state.step, names)  # the log line reads the latest ones
        elif state.step % self.check_every == 0:
            self._act(state, self._read(self._take_gradients((norms, state.step, names))))

    def after_optimizer_step(self, state: TrainState) -> None:
        if self._origin is None:
            self._begin(state)
        if self.folded:
            return
        self._act(state, self._read(self._take_window(state)))  # one host sync per window

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
        # The steps since the last read (every rank reaches fit_end). Folded: nothing after a run's last log line
        # (its last step logs), only what a run stopped early took since, read here in a read of its own.
        if self.folded:
            values = self._provide()
            if values is not None:
                self._consume(state.accelerator.gather(values.float().reshape(1, -1)).tolist())
        else:
            self._read_nonfinite(state)
        if state.accelerator.is_main_process:
            codes = [f["code"] for f in self.findings]
            tqdm.write("doctor: no findings" if not codes else
                       f"doctor: {len(codes)} finding(s): {', '.join(codes)} (see summary.json, \"doctor\")")

    # --- the values: taken from the device accumulators as pieces, read, and acted on -------------------------
    # A piece is (name, device tensor, context): the values' meaning (their steps, the parameters' names). The same
    # pieces go through `_read` (a sync of the doctor's own, check_every N) or the log line's read (`_provide`,
    # `_consume`), and the same `_act` turns their floats into findings.
    def _first_loss(self, state: TrainState, loss: torch.Tensor, outputs: Any) -> torch.Tensor | None:
        """Step 0 of a fresh run: the first loss (and the logits' spread) to check against ln C, on the device; None
        when there is nothing to check."""
        self._chance = expected_initial_loss(state.task, outputs)
        if not self.initial_loss or state.step > 0 or self._chance is None:
            return None
        spread = isinstance(outputs, torch.Tensor) and outputs.is_floating_point() and outputs.numel() > 1
        return torch.stack([loss, outputs.detach().float().std()] if spread else [loss])

    def _take_first(self) -> list[Piece]:
        first, self._first = self._first, None
        return [] if first is None else [("first", first, 0)]

    def _take_gradients(self, norms: tuple[torch.Tensor, int, list[str]] | None) -> list[Piece]:
        """The largest total gradient norm since the last take, the first steps' norms once they are all there
        (taken once), and `norms`: a step's per-parameter norms, with that step and the parameters' names."""
        pieces: list[Piece] = []
        if self._max_norm is not None:
            pieces.append(("max", self._max_norm, (self._max_since, self._grad_step)))
            if not self._early_taken and len(self._early_norms) == BASELINE_STEPS:
                pieces.append(("early", torch.stack(self._early_norms), None))
                self._early_taken = True
            self._max_norm, self._max_since = None, self._grad_step + 1
        if norms is not None:
            pieces.append(("norms", norms[0], norms[1:]))
        return pieces

    def _window_due(self, state: TrainState) -> bool:
        return bool(self.plateau_window) and state.step - self._window_start >= self.plateau_window

    def _take_window(self, state: TrainState) -> list[Piece]:
        """The plateau window's losses once `plateau_window` steps have passed (the window then starts afresh)."""
        if not self._window_due(state):
            return []
        window, steps = self._window, (self._window_start, state.step - 1)
        self._window, self._window_start = [], state.step
        return [("window", torch.stack(window), steps)] if window else []

    @staticmethod
    def _read(pieces: list[Piece]) -> dict[str, tuple[list[float], Any]]:
        """A read of the doctor's own: `pieces` in one host sync (none when there are none)."""
        if not pieces:
            return {}
        values = torch.cat([tensor.reshape(-1).float() for _, tensor, _ in pieces]).tolist()
        return Doctor._split(values, [(name, tensor.numel(), context) for name, tensor, context in pieces])

    @staticmethod
    def _split(values: list[float], layout: list[tuple[str, int, Any]]) -> dict[str, tuple[list[float], Any]]:
        parts, offset = {}, 0
        for name, length, context in layout:
            parts[name] = (values[offset:offset + length], context)
            offset += length
        return parts

    def _provide(self) -> torch.Tensor | None:
        """For the log line's read (check_every None): everything not read yet, on the device; the same pieces on
        every rank (they depend on the step only). The non-finite flag goes last: `_consume` sums it over ranks."""
        state = self._state
        pieces = [*self._take_first(), *self._take_gradients(self._norms), *self._take_window(state)]
        self._norms = None
        if self._nonfinite is not None:
            pieces.append(("nonfinite", self._nonfinite.float(), (self._nonfinite_since, self._loss_step)))
            self._nonfinite = None
        self._layout = [(name, tensor.numel(), context) for name, tensor, context in pieces]
        return torch.cat([tensor.reshape(-1).float() for _, tensor, _ in pieces]) if pieces else None

    def _consume(self, per_rank: list[list[float]]) -> None:
        """The values `_provide` gave, read with the log line: this rank's, and the non-finite count of all ranks."""
        state = self._state
        parts = self._split(per_rank[state.accelerator.process_index], self._layout)
        if "nonfinite" in parts:  # the last value of each rank's row
            parts["nonfinite"] = ([sum(row[-1] for row in per_rank)], parts["nonfinite"][1])
        self._act(state, parts)

    def _read_nonfinite(self, state: TrainState) -> None:
        """A read of the doctor's own (check_every N): the non-finite flag summed over ranks (they all reach this at
        the same step), then acted on."""
        if self._nonfinite is None:
            return
        steps = (self._read_step, state.step)
        self._read_step = state.step
        count = state.accelerator.reduce(self._nonfinite.float(), reduction="sum").item()
        self._nonfinite = None
        if count:
            self._act(state, {**self._read(self._take_gradients(None)), "nonfinite": ([count], steps)})

    # --- acting on the values read -----------------------------------------------------------------------------
    def _act(self, state: TrainState, parts: dict[str, tuple[list[float], Any]]) -> None:
        """Report what the values read show, in this order: the first loss, exploding gradients (the better clue of
        a NaN: reported before it), vanishing gradients, a plateau, and last a non-finite loss, which may stop."""
        if "first" in parts:
            values, step = parts["first"]
            self.report(state, initial_loss_finding(values[0], self._chance, self.initial_loss_tolerance,
                                                    logits_std=values[1] if len(values) > 1 else None), step=step)
        norms, (norms_step, names) = parts.get("norms", ([], (0, [])))
        if "early" in parts:
            finite = [v for v in parts["early"][0] if math.isfinite(v) and v > 0]
            self._baseline = statistics.median(finite) if finite else None
        if "max" in parts:
            (max_norm,), steps = parts["max"]
            nonfinite = [name for name, value in zip(names, norms) if not math.isfinite(value)]
            self.report(state, exploding_gradient_finding(max_norm, self._baseline, self.explode_factor, steps,
                                                          nonfinite))
        if "norms" in parts and norms_step > 0:  # at step 0 a zero-initialised residual branch rightly gets 0
            layers = layer_gradient_norms(dict(zip(names, norms)))
            now = vanishing_layers(layers, self.vanish_ratio)
            before_step, before = self._vanishing_before
            persistent = {name: norm for name, norm in now.items() if name in before}
            self.report(state, vanishing_gradient_finding(persistent, layers, self.vanish_ratio,
                                                          (before_step, norms_step)))
            self._vanishing_before = (norms_step, set(now))
        if "window" in parts:
            self._act_plateau(state, *parts["window"])
        if "nonfinite" in parts and parts["nonfinite"][0][0]:
            self._act_nonfinite(state, parts["nonfinite"][1])

    def _act_plateau(self, state: TrainState, losses: list[float], steps: tuple[int, int]) -> None:
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

    def _act_nonfinite(self, state: TrainState, steps: tuple[int, int]) -> None:
        """A loss between `steps` was NaN/inf: replay the latest batch to name the layer, report, and stop."""
        layer = None
        if self._batch is not None and state.task is not None:
            model, batch = self._model, self._batch
            try:
                with state.accelerator.autocast():
                    layer = first_nonfinite_layer(model, lambda: state.task.forward(model, batch))
            except Exception as error:  # a replay that fails must not hide the finding
                tqdm.write(f"doctor: replaying the batch failed ({error}); reporting without the layer.")
        finding = nonfinite_loss_finding(layer, self._batch, steps, self.check_every,
                                         nonfinite_parameters(self._model))
        self.report(state, finding)
        if self.stop_on_nonfinite and not any(t.handles_nonfinite for t in state.techniques):  # one recovers
            raise NonFiniteLossError(f"training stopped: {finding.message} Fix: {finding.fix} (To keep training "
                                     "anyway: --techniques.doctor.stop_on_nonfinite false.)")
