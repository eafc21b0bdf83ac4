"""The training doctor: cheap checks that name a training problem once, with the evidence and the fix.

On by default (`TrainerConfig.doctor`; `--doctor false` turns it off, `--techniques.doctor.ARG VALUE` tunes it). Each
finding is printed once on the main process (`doctor: [code] step N: evidence`, then `fix: ...`), logged to the
trackers as `doctor/<code> = 1` at that step, and listed in summary.json under "doctor" ({code, step, message, fix}).
The checks follow Karpathy's "A Recipe for Training Neural Networks" (https://karpathy.github.io/2019/04/25/recipe/);
the hook named measures on the device, the check runs when the values are read (see Cost):

    code                 fires when (default thresholds)                                       measured in
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

A CUDA out-of-memory error is not a hook: `run_main` catches `torch.OutOfMemoryError` and reports it as a `FrameworkError`
with `out_of_memory_report` (framework/diagnosis.py: peak memory, and the flags that trade memory for something else); the recipe exits 2.

A non-finite loss stops training (`NonFiniteLossError`, framework/errors.py; `stop_on_nonfinite=False` only reports it): once a NaN has
reached an update, every weight it touched is NaN and every later step is wasted. The error names the layer and the
fixes. Gradients that overflowed first are reported first (`exploding_gradients`): the better clue.

Cost: on ordinary steps only device work (`isfinite` of the loss, `_foreach_norm` of the gradients, a running max),
and no host sync of the doctor's own: by default (`check_every` None) its values (the non-finite flag, the largest
total gradient norm since the last line, the first steps' norms for the baseline, the latest per-parameter norms, a
plateau window's losses once it is full, the first loss) ride in the training log line's one read
(`TrainState.read_with_log_line`: one gather, one host copy, every `log_every` steps and at the last step); the checks
run there, on the steps since the previous line (a plateau window is checked at the first line after it is full; the
first loss is reported with step 0). Only a run stopped between log lines has its remainder read at fit_end, and each
evaluation costs one read (the overfitting check). `check_every N` instead gives the doctor a read of its own every N
steps (plus once at step 0, once per plateau window and at fit_end). Measured on the 2-core CPU machine: the doctor's
hooks take 0.6-1.1 ms per step on the image recipe (ResNet, batch 64; a step there takes 150-1300 ms depending on the
machine's load), i.e. < 1%; on the tiniest model (Linear(4, 3), batch 4, steps of 9-18 ms, tests/test_loop.py
style) 0.2-0.3 ms per step, ~2%. benchmarks/host_syncs.py counts the syncs: with the default doctor, as many as
without it.

A NaN is therefore seen at the next log line (or up to `check_every - 1` steps late), when an update has usually spread
it into the weights: the replay then names the first layer whose weights are non-finite, says so, and suggests
`--techniques.doctor.check_every 1` (a host read per step, before the update) to stop at the first non-finite loss.
The verdict rests on the weights themselves, not on which layer first shows a NaN in the replay: NaN/inf weights
anywhere in the model are reported as such (an earlier layer may overflow first), and finite weights and inputs whose
products exceed the dtype's range (≈1e34 each after a far too high learning rate) are named as an overflow, with their
magnitudes.

Several ranks: the non-finite flag is summed over ranks at those reads (the log line gathers every rank's values; a
read of its own reduces the flag; every rank reaches either at the same step, so no rank waits alone) and every rank
stops together; the other checks use each rank's own values and only print, on the main process. Backends: the
gradient checks read `param.grad`, which DeepSpeed (the engine reduces and partitions gradients and steps inside
backward) and FSDP (sharded gradients) do not hold; there they are skipped, the loss checks still run. Nothing is
checkpointed: a resumed run starts the doctor afresh from the restored step (derived at its first training hook, after
the checkpoint is loaded, never in fit_start, which runs before the restore), skips the initial-loss check, and
compares its plateau windows with chance level only (the run's first losses, the other reference, are gone).

The package: findings.py holds the checks as pure functions (numbers and tensors in, a `Finding` or None out),
doctor.py the `Doctor` technique whose hooks feed them; the replay that names the first non-finite layer
(`first_nonfinite_layer`) and the out-of-memory report are framework/diagnosis.py's, shared with NaNGuard and the loop.
"""

from framework.diagnosis import (
    NonFiniteLayer,
    all_finite,
    first_nonfinite_layer,
    nonfinite_parameters,
    out_of_memory_report,
)
from framework.errors import NonFiniteLossError
from framework.techniques.doctor.doctor import Doctor
from framework.techniques.doctor.findings import (
    BASELINE_STEPS,
    OVERFLOW_FRACTION,
    Finding,
    expected_initial_loss,
    exploding_gradient_finding,
    frozen_modules,
    initial_loss_finding,
    layer_gradient_norms,
    missing_gradient_finding,
    nonfinite_loss_finding,
    output_classes,
    overfitting_finding,
    plateau_finding,
    unoptimized_finding,
    vanishing_gradient_finding,
    vanishing_layers,
)

__all__ = [
    "Doctor", "Finding", "NonFiniteLossError", "NonFiniteLayer", "BASELINE_STEPS", "OVERFLOW_FRACTION",
    "output_classes", "expected_initial_loss", "initial_loss_finding", "missing_gradient_finding",
    "unoptimized_finding", "frozen_modules", "layer_gradient_norms", "vanishing_layers", "vanishing_gradient_finding",
    "exploding_gradient_finding", "plateau_finding", "overfitting_finding", "nonfinite_loss_finding",
    "all_finite", "nonfinite_parameters", "first_nonfinite_layer", "out_of_memory_report",
]
