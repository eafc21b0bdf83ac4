"""The training doctor: cheap checks that name a training problem once, with the evidence and the fix.

On by default (`TrainerConfig.doctor`; `--doctor false` turns it off, `--techniques.doctor.ARG VALUE` tunes it). Each
finding is printed once on the main process (`doctor: [code] step N: evidence`, then `fix: ...`), logged to the
trackers as `doctor/<code> = 1` at that step, and listed in summary.json under "doctor" ({code, step, message, fix}).
The checks follow Karpathy's "A Recipe for Training Neural Networks" (https://karpathy.github.io/2019/04/25/recipe/):

    code                 fires when (default thresholds)                                       hook
    initial_loss         the first loss is off ln C (uniform predictions over C classes or a    on_loss, step 0
                         vocabulary) by more than max(0.5·ln C, 1 nat)
    no_gradient          a parameter that requires grad has no .grad after the first backward  after_backward, once
                         (never used, or cut off by .detach() / no_grad)
    not_optimized        a parameter that requires grad is in no optimizer parameter group     after_backward, once
    exploding_gradients  the total gradient norm is non-finite, or ≥ 100× the median of the     before_optimizer_step
                         first 5 steps
    vanishing_gradients  a layer's gradient norm is < 1e-6 × the median layer's at two checks   before_optimizer_step
                         in a row (never at step 0, where zero-initialised residual branches
                         rightly get 0)
    loss_plateau         the mean loss of a window's second half (100 steps per window) is not   after_optimizer_step
                         1% below the run's first 50 steps, or below ln C when that is lower
                         (a resumed run: ln C only)
    overfitting          val/loss stays above its best by max(5%, 0.05 nats) for 3 evaluations   epoch_end
                         while the training loss falls below its value then and below val/loss
    nonfinite_loss       the loss was NaN/inf: one forward with hooks on the latest batch names   on_loss
                         the first module whose output is non-finite; then training stops

A CUDA out-of-memory error is not a hook: the loop catches `torch.OutOfMemoryError` and raises a `FrameworkError`
with `out_of_memory_report` (peak memory, and the flags that trade memory for something else); the recipe exits 2.

A non-finite loss stops training (`NonFiniteLossError`; `stop_on_nonfinite=False` only reports it): once a NaN has
reached an update, every weight it touched is NaN and every later step is wasted. The error names the layer and the
fixes. Gradients that overflowed first are reported first (`exploding_gradients`): the better clue.

Cost: on ordinary steps only device work (`isfinite` of the loss, `_foreach_norm` of the gradients, a running max);
values reach the host in one read every `check_every` (50) steps, plus once at step 0, once per plateau window, once
per evaluation and at fit_end. Measured on the 2-core CPU machine: the doctor's hooks take 0.6-1.1 ms per step on the
image recipe (ResNet, batch 64; a step there takes 150-1300 ms depending on the machine's load), i.e. < 1%; on the
tiniest model (Linear(4, 3), batch 4, steps of 9-18 ms, tests/test_loop.py style) 0.2-0.3 ms per step, ~2%.

A NaN is therefore seen up to `check_every - 1` steps late, when an update has usually spread it into the weights:
the replay then names the first layer whose weights are non-finite, says so, and suggests
`--techniques.doctor.check_every 1` (a host read per step) to stop at the first non-finite loss. The verdict rests on
the weights themselves, not on which layer first shows a NaN in the replay: NaN/inf weights anywhere in the model are
reported as such (an earlier layer may overflow first), and finite weights and inputs whose products exceed the
dtype's range (≈1e34 each after a far too high learning rate) are named as an overflow, with their magnitudes.

Several ranks: the non-finite flag is summed over ranks at those reads (every rank reaches them at the same step, so
no rank waits alone) and every rank stops together; the other checks only print, on the main process. Backends: the
gradient checks read `param.grad`, which DeepSpeed (the engine reduces and partitions gradients and steps inside
backward) and FSDP (sharded gradients) do not hold; there they are skipped, the loss checks still run. Nothing is
checkpointed: a resumed run starts the doctor afresh from the restored step (derived at its first training hook, after
the checkpoint is loaded, never in fit_start, which runs before the restore), skips the initial-loss check, and
compares its plateau windows with chance level only (the run's first losses, the other reference, are gone).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from accelerate.utils import DistributedType
from tqdm.auto import tqdm

from framework.errors import ConfigError, FrameworkError
from framework.state import TrainState
from framework.task import Task
from framework.technique import Technique, register

#: Optimizer steps whose total gradient norm sets the baseline that "exploding" compares against (their median).
BASELINE_STEPS = 5


class NonFiniteLossError(FrameworkError, RuntimeError):
    """The loss became NaN/inf during training; the message names the first non-finite layer and the fixes."""


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
def _tensors(value: Any) -> Iterable[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


def all_finite(value: Any) -> bool:
    """True if every floating-point tensor in `value` (a tensor, or nested tuples/lists/dicts of them) is finite."""
    return all(bool(torch.isfinite(t).all()) for t in _tensors(value) if t.is_floating_point() or t.is_complex())


class NonFiniteLayer(NamedTuple):
    """Where a forward pass first turned non-finite."""

    name: str  # the module's name in the model ("" for the model itself)
    module_type: str  # its class name
    inputs_finite: bool  # False: it received NaN/inf already (from the batch or code outside submodules)
    weights_finite: bool  # False: its own weights are NaN/inf (an earlier update spread a NaN into them)
    input_max: float | None = None  # the largest |value| among its finite floating-point inputs (None: none)
    weight_max: float | None = None  # the largest |value| among its own finite weights (None: no weights)
    dtype: torch.dtype | None = None  # the dtype of its (first floating-point) output


def _abs_max(value: Any) -> float | None:
    """The largest |x| over the floating-point tensors in `value`, or None when there are none (or it is not finite)."""
    maxima = [t.detach().abs().max().float() for t in _tensors(value) if t.is_floating_point() and t.numel()]
    if not maxima:
        return None
    largest = float(torch.stack(maxima).max())
    return largest if math.isfinite(largest) else None


def nonfinite_parameters(model: torch.nn.Module) -> list[str]:
    """The names of the parameters that hold a NaN/inf, in the model's order (after an update spread one in)."""
    local = [(name, p.to_local() if hasattr(p, "to_local") else p) for name, p in model.named_parameters()]  # FSDP2
    return [name for name, p in local if p.numel() and not bool(torch.isfinite(p).all())]


@torch.no_grad()
def first_nonfinite_layer(model: torch.nn.Module, forward: Callable[[], Any]) -> NonFiniteLayer | None:
    """Run `forward()` once with a forward hook on every module of `model` and return the first module, in the order
    they finish, whose output holds a NaN/inf (inner modules finish before the modules that contain them), or None.

    The model is left as it was: hooks removed, buffers (BatchNorm statistics) restored.
    """
    names: dict[int, str] = {}
    for name, module in model.named_modules():
        names.setdefault(id(module), name)
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    found: list[NonFiniteLayer] = []

    def hook(module: torch.nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        if not found and not all_finite(output):
            weights = list(module.parameters(recurse=False)) or list(module.parameters())
            dtype = next((t.dtype for t in _tensors(output) if t.is_floating_point()), None)
            found.append(NonFiniteLayer(names[id(module)], type(module).__name__, all_finite((args, kwargs)),
                                        all_finite(list(module.parameters())), _abs_max((args, kwargs)),
                                        _abs_max(weights), dtype))

    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in model.modules()]
    try:
        forward()
    finally:
        for handle in handles:
            handle.remove()
        for name, b in model.named_buffers():
            if name in buffers:
                b.copy_(buffers[name])
    return found[0] if found else None


#: A layer whose largest |input| × largest |weight| reaches this fraction of its dtype's largest value overflows when
#: it sums products (a Linear or convolution sums fan-in of them; 1e-4 leaves room for 10,000).
OVERFLOW_FRACTION = 1e-4


def _overflows(layer: NonFiniteLayer) -> bool:
    if layer.input_max is None or layer.weight_max is None or layer.dtype is None:
        return False
    return layer.input_max * layer.weight_max >= OVERFLOW_FRACTION * torch.finfo(layer.dtype).max


def nonfinite_loss_finding(layer: NonFiniteLayer | None, batch: Any, steps: tuple[int, int],
                           check_every: int = 1, nonfinite_weights: Sequence[str] = ()) -> Finding:
    """The finding for a non-finite loss seen between `steps`, given what replaying the latest batch showed
    (`check_every` > 1: the doctor read its flag only every that many steps, and says how to stop earlier) and which
    parameters hold NaN/inf (`nonfinite_weights`, from `nonfinite_parameters`).

    The verdict rests on the weights, not on which layer shows a NaN first: weights that are NaN/inf anywhere are
    reported as such (an earlier layer may overflow first from finite but huge weights); finite weights and inputs
    whose products exceed the dtype's range are an overflow, with the magnitudes; otherwise the layer's own op."""
    rerun = (" Rerun with --techniques.doctor.check_every 1 to stop at the first non-finite loss."
             if check_every > 1 else "")
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


# --- out of memory -------------------------------------------------------------------------------------------------
def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def out_of_memory_report(error: BaseException, device: torch.device | str) -> str:
    """What to print when training ran out of memory: the error's first line, the peak memory when on CUDA, and the
    ways this framework trades memory for something else, with their exact flags."""
    device = torch.device(device)
    text = str(error).strip()
    lines = [f"out of memory on {device}: {text.splitlines()[0] if text else type(error).__name__}"]
    if device.type == "cuda":
        try:
            peak = torch.cuda.max_memory_allocated(device)
            reserved = torch.cuda.max_memory_reserved(device)
            total = torch.cuda.get_device_properties(device).total_memory
            lines.append(f"peak memory: {_gib(peak)} allocated by tensors, {_gib(reserved)} reserved by the caching "
                         f"allocator, of {_gib(total)} on this GPU.")
            if reserved > 1.25 * peak:
                lines.append("much more reserved than allocated: fragmentation; also try "
                             "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True.")
        except Exception as failure:  # the CUDA context may be unusable after the error
            lines.append(f"peak memory: unavailable ({failure}).")
    else:
        lines.append(f"peak memory: not measured on {device.type} (only CUDA reports it).")
    lines += [
        "to fit, try one of (most effective last):",
        "  - a smaller per-process batch: --data.batch_size <half of now>",
        "  - keep the effective batch with gradient accumulation: --gradient_accumulation_steps 2 (or more)",
        "  - bf16 mixed precision (activations in half the bytes): accelerate launch --config_file "
        "launch_configs/bf16.yaml ...",
        "  - gradient checkpointing (recompute activations in backward, ~1/3 more compute): "
        "--techniques.gradient_checkpointing.policy full",
        "  - DeepSpeed ZeRO (shard optimizer state and gradients over GPUs): launch_configs/deepspeed_zero2.yaml; "
        "parameters too: deepspeed_zero3.yaml; optimizer in CPU memory: deepspeed_zero3_offload.yaml",
    ]
    return "\n".join(lines)


# --- the technique ---------------------------------------------------------------------------------------------------
@register("doctor")
class Doctor(Technique):
    """Watch a run for the common ways training goes wrong; print each finding once with its evidence and fix.

    Hooks: fit_start, on_loss, after_backward, before_optimizer_step, after_optimizer_step, epoch_end, fit_end. See
    the module docstring for every finding, its threshold and what it costs.

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
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigError(f"doctor.{name} must be an integer ≥ {low}, got {value!r}.")
        for name, value in (("initial_loss_tolerance", initial_loss_tolerance), ("explode_factor", explode_factor),
                            ("vanish_ratio", vanish_ratio), ("min_decrease", min_decrease),
                            ("overfit_min_rise", overfit_min_rise)):
            if not value > 0:
                raise ConfigError(f"doctor.{name} must be positive, got {value!r}.")
        if plateau_window == 1:
            raise ConfigError("doctor.plateau_window must be 0 (off) or at least 2 (it compares two halves).")
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
