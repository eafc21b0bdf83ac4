"""The doctor's findings as pure functions: each takes numbers, tensors or a model and returns a `Finding` (the
problem, its evidence and the fix) or None. The package docstring (framework/techniques/doctor/__init__.py) lists
every finding, when it fires and what it costs; `Doctor` (doctor.py) calls these from its hooks.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from framework.diagnosis import NonFiniteLayer, all_finite
from framework.task import Task

#: Optimizer steps whose total gradient norm sets the baseline that "exploding" compares against (their median).
BASELINE_STEPS = 5


@dataclass(frozen=True)
class Finding:
    """One problem the doctor found: a short `code`, the `message` with its evidence, and the `fix`."""

    code: str
    message: str
    fix: str

    def format(self, step: int) -> str:
        return f"doctor: [{self.code}] step {step}: {self.message}\n        fix: {self.fix}"


# --- initial loss --------------------------------------------------------------------------------------------------
def output_classes(task: Any, outputs: Any) -> int | None:
    """The number of classes the loss chooses among, as the task declares it (`Task.output_classes`: a language
    model's vocabulary is its logits' size); for an object that is no `Task`, its `num_classes` attribute."""
    classes = task.output_classes(outputs) if isinstance(task, Task) else getattr(task, "num_classes", None)
    return int(classes) if classes else None


def expected_initial_loss(task: Any, outputs: Any) -> float | None:
    """The loss a freshly initialised model should start near, or None when unknown.

    Cross-entropy over C classes with near-uniform predictions is ln C, whatever the targets (soft targets from
    label smoothing or Mixup included). A task may define `expected_initial_loss(outputs)` to say its own.
    """
    own = getattr(task, "expected_initial_loss", None)
    if callable(own):
        return own(outputs)
    classes = output_classes(task, outputs)
    return math.log(classes) if classes and classes > 1 else None


def initial_loss_finding(loss: float, expected: float | None, tolerance: float = 0.5, min_nats: float = 1.0,
                         logits_std: float | None = None) -> Finding | None:
    """A finding when the first loss is far from `expected`: off by more than max(tolerance · expected, min_nats).

    For 10 classes (ln 10 = 2.30) that is outside [1.15, 3.45]; for 3 classes outside [0.10, 2.10]. The floor of 1
    nat keeps small class counts quiet: default-initialised heads give logits of std ≈ 0.6, an excess of ≈ σ²/2
    nats, and the first batch may be small; a badly scaled init is off by many nats.
    """
    if expected is None or not math.isfinite(loss):
        return None
    if abs(loss - expected) <= max(tolerance * expected, min_nats):
        return None
    classes = round(math.exp(expected))
    spread = f"; logits std {logits_std:.3g}" if logits_std is not None else ""
    evidence = (f"the first loss is {loss:.4g} nats, but a freshly initialised model predicting near-uniformly over "
                f"{classes} classes starts at ln({classes}) = {expected:.3f}{spread}")
    if loss > expected:
        return Finding("initial_loss", evidence + ": the initial predictions are confidently wrong.",
                       "the output layer starts too large: scale its weights down at init (e.g. ×0.01, or zero "
                       "the final layer's weights and bias), keep inputs normalised (mean 0, std 1), and check that "
                       "the loss is a mean, not a sum, over the batch.")
    return Finding("initial_loss", evidence + ": lower than a random model can reach.",
                   "expected when the model is pretrained or its weights were loaded (then turn this check off: "
                   "--techniques.doctor.initial_loss false); otherwise the loss is scaled down (divided twice, "
                   "e.g. by the accumulation steps, or averaged over more elements than it sums).")


# --- gradients -----------------------------------------------------------------------------------------------------
def _names(names: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def missing_gradient_finding(named_parameters: Iterable[tuple[str, torch.nn.Parameter]]) -> Finding | None:
    """A finding for parameters that require a gradient but got none (`.grad is None`) from a backward pass."""
    missing = [(name, p.numel()) for name, p in named_parameters if p.requires_grad and p.grad is None]
    if not missing:
        return None
    values = sum(n for _, n in missing)
    return Finding(
        "no_gradient",
        f"{len(missing)} parameter tensors ({values:,} values) received no gradient from the first backward pass: "
        f"{_names([name for name, _ in missing])}. They never train.",
        "they are not in the loss's graph: look for .detach(), torch.no_grad(), .item()/.numpy() round trips or a "
        "module that forward never calls; delete them, or freeze them on purpose with requires_grad_(False). Under "
        "DDP an unused parameter also makes the next step fail.")


def unoptimized_finding(named_parameters: Iterable[tuple[str, torch.nn.Parameter]],
                        optimizer: torch.optim.Optimizer) -> Finding | None:
    """A finding for parameters that require a gradient but are in none of the optimizer's parameter groups."""
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    left_out = [name for name, p in named_parameters if p.requires_grad and id(p) not in optimized]
    if not left_out:
        return None
    return Finding(
        "not_optimized",
        f"{len(left_out)} parameter tensors get gradients but are in no optimizer parameter group: "
        f"{_names(left_out)}. The optimizer never updates them.",
        "build the optimizer after the model is complete, from model.parameters() (a module added or replaced "
        "after the optimizer was built is not in it), or freeze them with requires_grad_(False).")


def frozen_modules(model: torch.nn.Module) -> list[str]:
    """The outermost modules all of whose parameters are frozen (requires_grad False), when others train."""
    parameters = dict(model.named_parameters())
    if not parameters or all(not p.requires_grad for p in parameters.values()):
        return []
    frozen: list[str] = []
    for name, module in model.named_modules():
        own = list(module.parameters())
        if name and own and not any(p.requires_grad for p in own) \
                and not any(name.startswith(outer + ".") for outer in frozen):
            frozen.append(name)
    return frozen


def layer_gradient_norms(named_norms: Mapping[str, float]) -> dict[str, float]:
    """Per-parameter gradient norms grouped by the module that owns them (`a.b.weight` → `a.b`): the layer's norm
    is the root of the sum of squares. Non-finite norms are left out (the exploding check reports those)."""
    squares: dict[str, float] = {}
    for name, norm in named_norms.items():
        if math.isfinite(norm):
            layer = name.rpartition(".")[0] or name
            squares[layer] = squares.get(layer, 0.0) + norm * norm
    return {layer: math.sqrt(total) for layer, total in squares.items()}


def vanishing_layers(layer_norms: Mapping[str, float], ratio: float = 1e-6) -> dict[str, float]:
    """The layers whose gradient norm is below `ratio` × the median layer's (none when fewer than 2 layers)."""
    if len(layer_norms) < 2:
        return {}
    median = statistics.median(layer_norms.values())
    return {name: norm for name, norm in layer_norms.items() if median > 0 and norm < ratio * median}


def vanishing_gradient_finding(vanishing: Mapping[str, float], layer_norms: Mapping[str, float],
                               ratio: float, steps: tuple[int, int]) -> Finding | None:
    """A finding naming the layers in `vanishing` (found at both `steps`), with their norms and the median's."""
    if not vanishing:
        return None
    median = statistics.median(layer_norms.values())
    listed = [f"{name or '(model)'} ({norm:.2e})" for name, norm in sorted(vanishing.items(), key=lambda item: item[1])]
    return Finding(
        "vanishing_gradients",
        f"at steps {steps[0]} and {steps[1]}, {len(vanishing)} of {len(layer_norms)} layers had a gradient norm below "
        f"{ratio:g} × the median layer's ({median:.2e}): {_names(listed)}. They barely train.",
        "something between them and the loss scales the signal to ~0: a tiny multiplier or init, saturated "
        "sigmoid/tanh, dead ReLUs, no normalisation or residual path. Use Kaiming/Xavier init, ReLU/GELU with "
        "BatchNorm/LayerNorm and residual connections; freeze a layer on purpose with requires_grad_(False).")


def exploding_gradient_finding(max_norm: float, baseline: float | None, factor: float = 100.0,
                               steps: tuple[int, int] = (0, 0),
                               nonfinite_parameters: Sequence[str] = ()) -> Finding | None:
    """A finding when the largest total gradient norm over `steps` is non-finite, or ≥ `factor` × `baseline` (the
    median total norm of the first steps)."""
    fix = ("lower the learning rate (--optimizer.lr, e.g. ÷10; --find_lr suggests one), warm it up "
           "(--techniques.cosine_lr.warmup_epochs 1), clip gradients (--techniques.gradient_clipping.max_norm 1.0), "
           "and add normalisation layers; under fp16 prefer bf16 (launch_configs/bf16.yaml).")
    where = f"between steps {steps[0]} and {steps[1]}" if steps[0] != steps[1] else f"at step {steps[0]}"
    if not math.isfinite(max_norm):
        named = f" (non-finite in {_names(list(nonfinite_parameters))})" if nonfinite_parameters else ""
        return Finding("exploding_gradients", f"the total gradient norm became non-finite ({max_norm}) {where}{named}.",
                       fix)
    if baseline is not None and baseline > 0 and max_norm >= factor * baseline:
        return Finding(
            "exploding_gradients",
            f"the total gradient norm reached {max_norm:.3g} {where}, {max_norm / baseline:,.0f}× the median "
            f"{baseline:.3g} of the first {BASELINE_STEPS} steps (threshold {factor:g}×).", fix)
    return None


# --- loss curves ---------------------------------------------------------------------------------------------------
def plateau_finding(losses: Sequence[float], min_decrease: float = 0.01, reference: float | None = None,
                    steps: tuple[int, int] | None = None, reference_name: str = "the first half") -> Finding | None:
    """A finding when the loss did not go down: the mean of the window's second half is not `min_decrease` (1%)
    below `reference` (default: the mean of its first half).

    The doctor passes as reference the smaller of the first window's first-half mean and the chance-level loss
    (ln C), so a loss that only falls to chance and stays there is caught, and a converged run never is.
    """
    values = [float(v) for v in losses]
    if len(values) < 2 or not all(math.isfinite(v) for v in values):
        return None
    half = len(values) // 2
    latest = statistics.fmean(values[half:])
    first = statistics.fmean(values[:half])
    if reference is None:
        reference, reference_name = first, "the first half"
    if latest < (1 - min_decrease) * reference:
        return None
    span = f" over steps {steps[0]}-{steps[1]}" if steps else ""
    return Finding(
        "loss_plateau",
        f"the training loss is not decreasing{span}: mean {latest:.4g} in the window's second half against "
        f"{reference:.4g} for {reference_name} (less than {min_decrease:.0%} lower).",
        "check that the learning rate is not 0 or tiny (the lr on the log line; --preview_lr draws the schedule, "
        "--find_lr suggests one), that the optimizer holds the model's parameters, and that labels match inputs: "
        "first make it overfit a few batches (--overfit_batches 2).")


def overfitting_finding(train_losses: Sequence[float], val_losses: Sequence[float], patience: int = 3,
                        min_rise: float = 0.05, min_nats: float = 0.05) -> Finding | None:
    """A finding when the validation loss has risen while the training loss fell (one entry per evaluation in both
    lists): its last `patience` values all exceed its best by max(`min_rise` · best, `min_nats`), and the training
    loss is now below both its value at that best and the validation loss.

    The last two conditions keep a healthy run quiet: with label smoothing or augmentation the training loss stays
    above the validation loss, and a late drift of a few hundredths of a nat (a confident model's calibration, its
    accuracy unchanged) is not the memorisation this reports.
    """
    if len(val_losses) != len(train_losses) or len(val_losses) < patience + 1:
        return None
    best = min(range(len(val_losses)), key=lambda i: val_losses[i])
    since = len(val_losses) - 1 - best
    threshold = val_losses[best] + max(min_rise * val_losses[best], min_nats)
    rising = all(v >= threshold for v in val_losses[best + 1:][-patience:])
    if since < patience or not rising or not train_losses[-1] < min(train_losses[best], val_losses[-1]):
        return None
    return Finding(
        "overfitting",
        f"validation loss rose from {val_losses[best]:.4g} (its best, evaluation {best + 1}) to "
        f"{val_losses[-1]:.4g} over {since} evaluations while the training loss fell from "
        f"{train_losses[best]:.4g} to {train_losses[-1]:.4g}: the model memorises the training set.",
        "regularise: augmentation (--data.augment, see recipes/configs/digits_regularized.yaml), Mixup/CutMix "
        "(--techniques.mixup.alpha 0.2), dropout or stochastic depth (--techniques.stochastic_depth.rate 0.1), "
        "weight decay (--optimizer.weight_decay 0.05), label smoothing (--techniques.label_smoothing.epsilon 0.1), "
        "early stopping (--techniques.early_stopping.patience 3); or more data, a smaller model.")


# --- non-finite values -----------------------------------------------------------------------------------------------
#: A layer whose largest |input| × largest |weight| reaches this fraction of its dtype's largest value overflows when
#: it sums products (a Linear or convolution sums fan-in of them; 1e-4 leaves room for 10,000).
OVERFLOW_FRACTION = 1e-4


def _overflows(layer: NonFiniteLayer) -> bool:
    if layer.input_max is None or layer.weight_max is None or layer.dtype is None:
        return False
    return layer.input_max * layer.weight_max >= OVERFLOW_FRACTION * torch.finfo(layer.dtype).max


def nonfinite_loss_finding(layer: NonFiniteLayer | None, batch: Any, steps: tuple[int, int],
                           check_every: int | None = 1, nonfinite_weights: Sequence[str] = ()) -> Finding:
    """The finding for a non-finite loss seen between `steps`, given what replaying the latest batch showed
    (`check_every` > 1: the doctor read its flag only every that many steps; None: with the log lines, after the
    updates; either way it says how to stop earlier) and which parameters hold NaN/inf (`nonfinite_weights`, from
    `nonfinite_parameters`).

    The verdict rests on the weights, not on which layer shows a NaN first: weights that are NaN/inf anywhere are
    reported as such (an earlier layer may overflow first from finite but huge weights); finite weights and inputs
    whose products exceed the dtype's range are an overflow, with the magnitudes; otherwise the layer's own op."""
    rerun = (" Rerun with --techniques.doctor.check_every 1 to stop at the first non-finite loss."
             if check_every is None or check_every > 1 else "")
    where = f"at step {steps[1]}" if steps[0] == steps[1] else f"between steps {steps[0]} and {steps[1]}"
    bad_keys = [key for key, value in batch.items() if not all_finite(value)] if isinstance(batch, Mapping) else []
    spread = ("an update with non-finite gradients reached them (gradients overflow before the loss does when the "
              "learning rate is far too high).")
    bad_weights = _names([f"`{name}`" for name in nonfinite_weights])
    if layer is None:
        cause = ("the latest batch runs finite everywhere: an earlier batch produced it, or the backward pass did "
                 "(--detect_anomaly true names the op)." + rerun)
        if nonfinite_weights:
            cause = f"the weights are already NaN/inf in {bad_weights}: {spread}{rerun}"
    else:
        label = f"`{layer.name}` ({layer.module_type})" if layer.name else \
            f"the model's own forward ({layer.module_type})"
        if not layer.weights_finite:
            named = f" ({bad_weights})" if nonfinite_weights else ""
            cause = f"the first non-finite output comes from {label}, whose weights are already NaN/inf{named}: " \
                    f"{spread}{rerun}"
        elif nonfinite_weights and layer.inputs_finite:
            cause = (f"the first non-finite output comes from {label} (its own weights finite), and the weights are "
                     f"already NaN/inf in {bad_weights}: {spread}{rerun}")
        elif layer.inputs_finite and _overflows(layer):
            dtype = str(layer.dtype).removeprefix("torch.")
            cause = (f"the first non-finite output comes from {label}, an overflow: its weights reach "
                     f"{layer.weight_max:.3g} and its inputs {layer.input_max:.3g}, so their products overflow "
                     f"{dtype} (largest {torch.finfo(layer.dtype).max:.3g}). Updates with a far too high learning "
                     f"rate grew them (or the inputs are not normalised).{rerun}")
        elif not layer.inputs_finite:
            source = (f"the batch itself holds NaN/inf in {bad_keys}" if bad_keys else
                      "code outside any submodule (a functional op in a parent's forward) produced them")
            cause = f"the first non-finite output comes from {label}, whose inputs were already non-finite: {source}."
        else:
            cause = (f"the first non-finite output comes from {label}: it turns finite inputs into NaN/inf "
                     "(log/sqrt of a negative, division by zero, exp overflow?).")
    return Finding(
        "nonfinite_loss", f"the loss became NaN/inf {where}; replaying the latest batch: {cause}",
        "guard the operation (clamp before log/sqrt, add an eps to divisions), lower the learning rate "
        "(--optimizer.lr), clip gradients (--techniques.gradient_clipping.max_norm 1.0), use bf16 "
        "(launch_configs/bf16.yaml) rather than fp16, and check the data for NaN/inf.")
