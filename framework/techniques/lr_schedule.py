"""Learning-rate schedules: torch's own schedulers, with periods in optimizer steps or epochs and optional warmup.

Every schedule is built at `fit_start`, when the run's real number of optimizer steps per epoch (after world size
and gradient accumulation) is known, and converts epoch periods with it. Per-step schedules step once per optimizer
step in `after_optimizer_step` (never per micro-batch, never once per rank: they are not given to
`accelerator.prepare`, whose wrapper would step them `num_processes` times). `plateau_lr` steps on a validation metric
in `epoch_end`. Linear warmup (Goyal et al., https://arxiv.org/abs/1706.02677) runs first, up to the LR the schedule
starts at (the optimizer's LR; for onecycle_lr its LR / div_factor): the LR of step s (0-based) is
start · (s + 1) / warmup_steps, reaching it on the last warmup step.

A warmup given in epochs that is not shorter than the run (a run cut short by `max_steps`: a smoke test) shrinks to
`SHRUNK_WARMUP` of the run (at least 1 step, always shorter than the run) with one warning line; a warmup given in
steps that does not fit is refused. Drops at step or epoch boundaries (step_lr's step size, multistep_lr's milestones)
count from the start of the run, warmup included, as torch's schedulers would be used without one: milestones at
epochs 15 and 25 drop there whatever the warmup; a drop inside the warmup is refused. Curves with a length of their
own (cosine_lr's period, cosine_restarts_lr's cycles, onecycle_lr) start where the warmup ends.

With several parameter groups (layerwise_lr) every group follows the same schedule from its own LR, and a floor
(`eta_min`, `min_lr`) is the floor of the base group: a group with an `lr_scale` (its LR over the optimizer's) stops at
floor × lr_scale, so the groups' LR ratios hold to the end (as timm's and BEiT's schedulers do). One schedule per run:
two would multiply each other's LR (`sets_learning_rate`, checked before training).

The pure function is `schedule_lrs`: the LR at every step of a run, for previews and tests.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torch.optim import lr_scheduler

from framework.errors import ConfigError, require
from framework.plots import plot_lr_curves
from framework.state import TrainState
from framework.technique import Technique, register

SHRUNK_WARMUP = 0.1  # a warmup in epochs longer than the run shrinks to this fraction of it


def to_steps(steps: float | None, epochs: float | None, steps_per_epoch: int, name: str) -> int | None:
    """A period given in optimizer steps or in epochs, as optimizer steps (None when neither is given)."""
    if steps is not None and epochs is not None:
        raise ConfigError(f"{name}: give it in steps or in epochs, not both.")
    if epochs is not None:
        return max(1, round(epochs * steps_per_epoch))
    return None if steps is None else int(steps)


def on_main_process(state: TrainState) -> bool:
    """Whether this rank reports (warnings): the main process, or a simulation without an accelerator."""
    return state.accelerator is None or state.accelerator.is_main_process


def group_floors(optimizer: torch.optim.Optimizer, floor: float) -> list[float]:
    """Each parameter group's LR floor: `floor` for the base group, floor × `lr_scale` for a group whose LR is
    `lr_scale` × the optimizer's (layerwise_lr stores it), so the groups' LR ratios hold at the floor too."""
    return [floor * group.get("lr_scale", 1.0) for group in optimizer.param_groups]


def cosine_factor(step: int, period: int, cycle_mult: int | None = None) -> float:
    """(1 + cos(π · t / T)) / 2 at `step`: one cosine of `period` steps (continuing past it, as torch's
    CosineAnnealingLR does), or with `cycle_mult` restarts whose cycles grow `cycle_mult` times (SGDR, as torch's
    CosineAnnealingWarmRestarts)."""
    position, length = step, period
    if cycle_mult == 1:
        position = step % period
    elif cycle_mult is not None:
        while position >= length:  # log(step) / log(cycle_mult) cycles
            position, length = position - length, length * cycle_mult
    return 0.5 * (1.0 + math.cos(math.pi * position / length))


class StepFactor:
    """A LambdaLR factor: `gamma` to the number of whole `size`-step periods since the start of the run, for a
    scheduler started `offset` steps into it (after the warmup): StepLR's curve at absolute step boundaries."""

    def __init__(self, size: int, gamma: float, offset: int = 0):
        self.size, self.gamma, self.offset = size, gamma, offset

    def __call__(self, step: int) -> float:
        return self.gamma ** ((step + self.offset) // self.size)


class CosineFactor:
    """A LambdaLR factor: cosine annealing from a group's LR down to `floor_fraction` of it (see `cosine_factor`).

    A callable object, not a lambda, so LambdaLR's state_dict saves its fields with the checkpoint."""

    def __init__(self, floor_fraction: float, period: int, cycle_mult: int | None = None):
        self.floor_fraction, self.period, self.cycle_mult = floor_fraction, period, cycle_mult

    def __call__(self, step: int) -> float:
        return self.floor_fraction + (1.0 - self.floor_fraction) * cosine_factor(step, self.period, self.cycle_mult)


def cosine_scheduler(optimizer: torch.optim.Optimizer, eta_min: float, period: int,
                     cycle_mult: int | None = None) -> lr_scheduler.LambdaLR:
    """torch's LambdaLR annealing every group from its own LR to its own floor (`group_floors`)."""
    factors = []
    for group, floor in zip(optimizer.param_groups, group_floors(optimizer, eta_min)):
        start = group.get("initial_lr", group["lr"])  # the LR the schedule starts from, before any warmup
        factors.append(CosineFactor(floor / start if start else 0.0, period, cycle_mult))
    return lr_scheduler.LambdaLR(optimizer, factors)


def schedule_lrs(schedule: LRSchedule, steps_per_epoch: int, max_steps: int, base_lr: float = 1.0,
                 metric: Callable[[int], float] = lambda epoch: 1.0, lr_scale: float = 1.0) -> list[float]:
    """The LR of every optimizer step of a run with `schedule` (a copy is simulated on a one-parameter optimizer;
    `metric(epoch)` feeds plateau schedules). `lr_scale`: the simulated group's share of the optimizer's LR
    (`base_lr` is already scaled), as layerwise_lr sets it; its floor is scaled alike."""
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=base_lr, momentum=0.9)  # momentum: OneCycle cycles it
    optimizer.param_groups[0]["lr_scale"] = lr_scale
    state = TrainState(None, parameter, optimizer, Path("."), steps_per_epoch=steps_per_epoch, max_steps=max_steps,
                       validates=True)
    schedule = copy.deepcopy(schedule)
    schedule.fit_start(state)
    lrs = []
    for step in range(1, max_steps + 1):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        state.step = step
        schedule.after_optimizer_step(state)
        if step % steps_per_epoch == 0:
            state.epoch += 1
            state.eval_metrics = {getattr(schedule, "metric", "val/loss"): metric(state.epoch)}
            state.eval_step = step
            schedule.epoch_end(state)
    return lrs


def draw_lr_schedule(techniques: list[Technique], optimizer: torch.optim.Optimizer, steps_per_epoch: int,
                     max_steps: int, path: Path) -> dict[str, list[float]]:
    """The LR each schedule technique gives each step of a run (first parameter group of `optimizer`), drawn to
    `path`. Simulated on copies of the schedules: call it before `fit_start` binds them to the (DeepSpeed) optimizer."""
    base = optimizer.param_groups[0]["lr"]
    scale = optimizer.param_groups[0].get("lr_scale", 1.0)  # layerwise_lr: the group's floor scales too
    curves = {t.name: schedule_lrs(t, steps_per_epoch, max_steps, base, lr_scale=scale)
              for t in techniques if t.sets_learning_rate}
    curves = curves or {"constant": [base] * max_steps}
    plot_lr_curves({f"{', '.join(curves)}: {max_steps} steps": curves}, path, steps_per_epoch)
    return curves


def draw_schedule_at_start(trainer: Any) -> None:
    """A new run's schedule, drawn to output_dir/lr_schedule.png (on the main process, when a technique sets the LR)
    and logged with the run's pictures. Drawn before `fit_start`, while the schedules are not yet bound."""
    state = trainer.state
    if trainer.accelerator.is_main_process and any(t.sets_learning_rate for t in trainer.techniques):
        draw_lr_schedule(trainer.techniques, state.optimizer, state.steps_per_epoch, state.max_steps,
                         state.output_dir / "lr_schedule.png")
        trainer.pictures.setdefault("lr_schedule", lambda path: None)  # already at output_dir/lr_schedule.png


def preview_lr(trainer: Any) -> dict[str, Any]:
    """`--preview_lr`: draw the LR every schedule technique gives each step of the prepared `trainer`'s run (first
    parameter group) to output_dir/lr_schedule.png; nothing is trained."""
    accelerator, state = trainer.accelerator, trainer.state
    path = state.output_dir / "lr_schedule.png"
    curves = draw_lr_schedule(trainer.techniques, state.optimizer, state.steps_per_epoch, state.max_steps, path) \
        if accelerator.is_main_process else {}
    if accelerator.is_main_process:
        print(f"wrote {path}")
    accelerator.end_training()
    return {"lr_schedule": str(path), "lrs": curves}


class LRSchedule(Technique):
    """Base of the schedules: linear warmup, then the torch scheduler that `build` returns.

    Args:
        warmup_steps / warmup_epochs: length of the linear warmup (none by default).
    """

    sets_learning_rate = True  # only one technique of a run may (checked before training)
    per_step = True  # False: stepped on a metric at the end of each epoch (plateau)

    def __init__(self, warmup_steps: int | None = None, warmup_epochs: float | None = None):
        self.warmup_steps = warmup_steps
        self.warmup_epochs = warmup_epochs
        self.scheduler: lr_scheduler.LRScheduler | None = None

    def build(self, optimizer: torch.optim.Optimizer, state: TrainState, steps: int) -> lr_scheduler.LRScheduler:
        """torch's scheduler for the `steps` optimizer steps after the warmup."""
        raise NotImplementedError

    def fit_start(self, state: TrainState) -> None:
        self.warmup = to_steps(self.warmup_steps, self.warmup_epochs, state.steps_per_epoch, f"{self.name}.warmup") or 0
        if self.warmup >= state.max_steps and self.warmup_epochs is not None:  # a short run (max_steps): shrink
            shrunk = min(state.max_steps - 1, max(1, int(state.max_steps * SHRUNK_WARMUP)))
            if on_main_process(state):  # fit_start runs on every rank
                warnings.warn(f"{self.name}: warmup_epochs={self.warmup_epochs:g} is {self.warmup} steps, not shorter "
                              f"than this run ({state.max_steps} steps); warming up over {shrunk} steps instead "
                              f"({SHRUNK_WARMUP:.0%} of the run)", stacklevel=2)
            self.warmup = shrunk
        if self.warmup >= state.max_steps:
            raise ConfigError(
                f"{self.name}: warmup ({self.warmup} steps) is not shorter than the whole run ({state.max_steps} "
                "steps); shorten the warmup or train longer."
            )
        # accelerate's optimizer wrapper shares its param_groups with the optimizer inside (torch's or DeepSpeed's).
        optimizer = state.optimizer
        if not self.warmup:
            self.scheduler = self.build(optimizer, state, state.max_steps)
            return
        warmup = lr_scheduler.LinearLR(optimizer, 1.0 / self.warmup, 1.0, total_iters=self.warmup - 1)
        if not self.per_step:
            self.scheduler, self.after_warmup = warmup, self.build(optimizer, state, state.max_steps - self.warmup)
            return
        main = self.build(optimizer, state, state.max_steps - self.warmup)
        self.scheduler = lr_scheduler.SequentialLR(optimizer, [warmup, main], milestones=[self.warmup])

    def lr_schedulers(self) -> list[lr_scheduler.LRScheduler]:
        schedulers = [self.scheduler, getattr(self, "after_warmup", None)]  # plateau: the one after the warmup too
        return [s for i, s in enumerate(schedulers) if s is not None and s not in schedulers[:i]]

    def after_optimizer_step(self, state: TrainState) -> None:
        if getattr(state.optimizer, "step_was_skipped", False):  # fp16 overflow: the step did not happen
            return
        if self.per_step or state.step <= self.warmup:
            self.scheduler.step()

    def state_dict(self) -> dict[str, Any]:
        return {"scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self.scheduler.load_state_dict(state_dict["scheduler"])


@register("step_lr")
class StepLR(LRSchedule):
    """Multiply the LR by `gamma` every `step_size_steps` optimizer steps (or `step_size_epochs` epochs), counted from
    the start of the run: with step_size_epochs 10 the LR drops at epochs 10, 20, 30, whatever the warmup. A step
    size within the warmup (a drop before the warmup has ended) is refused."""

    example_args = {"step_size_epochs": 10}

    def __init__(self, step_size_steps: int | None = None, step_size_epochs: float | None = None, gamma: float = 0.1,
                 warmup_steps: int | None = None, warmup_epochs: float | None = None):
        super().__init__(warmup_steps, warmup_epochs)
        if step_size_steps is None and step_size_epochs is None:
            raise ConfigError("step_lr: give step_size_steps or step_size_epochs.")
        self.step_size_steps, self.step_size_epochs, self.gamma = step_size_steps, step_size_epochs, gamma

    def build(self, optimizer, state, steps):
        size = to_steps(self.step_size_steps, self.step_size_epochs, state.steps_per_epoch, "step_lr.step_size")
        require(size >= 1, f"step_lr: the step size must be 1 step or more, got {size}.")
        if not self.warmup:
            return lr_scheduler.StepLR(optimizer, size, self.gamma)
        if size < self.warmup:
            raise ConfigError(f"step_lr: the first drop (step {size} of the run) falls inside the warmup "
                              f"({self.warmup} steps); drops count from the start of the run: make the step size "
                              "at least the warmup, or shorten the warmup.")
        return lr_scheduler.LambdaLR(optimizer, StepFactor(size, self.gamma, self.warmup))  # boundaries from step 0


@register("multistep_lr")
class MultiStepLR(LRSchedule):
    """Multiply the LR by `gamma` at each milestone (optimizer steps, or epochs), counted from the start of the run:
    milestones_epochs [15, 25] drop at epochs 15 and 25, whatever the warmup. A milestone inside the warmup is
    refused; one at its end drops on the first step after it; one at or past the end of the run warns."""

    example_args = {"milestones_epochs": [15, 25]}

    def __init__(self, milestones_steps: list[int] | None = None, milestones_epochs: list[float] | None = None,
                 gamma: float = 0.1, warmup_steps: int | None = None, warmup_epochs: float | None = None):
        super().__init__(warmup_steps, warmup_epochs)
        if not (milestones_steps or milestones_epochs):
            raise ConfigError("multistep_lr: give milestones_steps or milestones_epochs.")
        self.milestones_steps, self.milestones_epochs, self.gamma = milestones_steps, milestones_epochs, gamma

    def build(self, optimizer, state, steps):
        if self.milestones_epochs is not None:
            milestones = [to_steps(None, e, state.steps_per_epoch, "multistep_lr") for e in self.milestones_epochs]
        else:
            milestones = list(self.milestones_steps)
        early = [m for m in milestones if m < self.warmup]
        if early:
            raise ConfigError(f"multistep_lr: milestones {early} (steps from the start of the run) fall inside the "
                              f"warmup ({self.warmup} steps); move them after it or shorten the warmup.")
        total = steps + self.warmup
        late = [m for m in milestones if m >= total]
        if late and on_main_process(state):
            warnings.warn(f"multistep_lr: milestones {late} (steps from the start of the run) fall at or after the end "
                          f"of the run ({total} steps): they will never apply.")
        # the scheduler starts counting when the warmup ends
        return lr_scheduler.MultiStepLR(optimizer, [m - self.warmup for m in milestones], self.gamma)


@register("exponential_lr")
class ExponentialLR(LRSchedule):
    """Multiply the LR by `gamma` every epoch (`per: epoch`, spread evenly over its steps) or every step."""

    def __init__(self, gamma: float = 0.9, per: Literal["epoch", "step"] = "epoch",
                 warmup_steps: int | None = None, warmup_epochs: float | None = None):
        super().__init__(warmup_steps, warmup_epochs)
        require(0.0 < gamma <= 1.0, f"exponential_lr.gamma must be within (0, 1], got {gamma}.")
        self.gamma, self.per = gamma, per

    def build(self, optimizer, state, steps):
        gamma = self.gamma ** (1.0 / state.steps_per_epoch) if self.per == "epoch" else self.gamma
        return lr_scheduler.ExponentialLR(optimizer, gamma)


@register("cosine_lr")
class CosineLR(LRSchedule):
    """Cosine annealing from the optimizer's LR to `eta_min` over the run after the warmup (Loshchilov & Hutter,
    https://arxiv.org/abs/1608.03983), or over `period_steps` / `period_epochs`. `eta_min` is the base group's
    floor; a layer-wise group's is eta_min × its lr_scale."""

    def __init__(self, eta_min: float = 0.0, period_steps: int | None = None, period_epochs: float | None = None,
                 warmup_steps: int | None = None, warmup_epochs: float | None = None):
        super().__init__(warmup_steps, warmup_epochs)
        self.eta_min, self.period_steps, self.period_epochs = eta_min, period_steps, period_epochs

    def build(self, optimizer, state, steps):
        period = to_steps(self.period_steps, self.period_epochs, state.steps_per_epoch, "cosine_lr.period") or steps
        if period < 1:
            raise ConfigError(f"cosine_lr: the period must last 1 step or more, got {period}.")
        return cosine_scheduler(optimizer, self.eta_min, period)  # CosineAnnealingLR's curve, with group floors


@register("cosine_restarts_lr")
class CosineRestartsLR(LRSchedule):
    """Cosine annealing with warm restarts (SGDR): the first cycle lasts `cycle_steps` / `cycle_epochs`, each next
    one `cycle_mult` times longer. `eta_min` is the base group's floor; a layer-wise group's is eta_min × its
    lr_scale."""

    example_args = {"cycle_epochs": 5, "cycle_mult": 2}

    def __init__(self, cycle_steps: int | None = None, cycle_epochs: float | None = None, cycle_mult: int = 1,
                 eta_min: float = 0.0, warmup_steps: int | None = None, warmup_epochs: float | None = None):
        super().__init__(warmup_steps, warmup_epochs)
        if cycle_steps is None and cycle_epochs is None:
            raise ConfigError("cosine_restarts_lr: give cycle_steps or cycle_epochs.")
        require(cycle_mult >= 1, f"cosine_restarts_lr.cycle_mult must be 1 or more, got {cycle_mult}.")
        self.cycle_steps, self.cycle_epochs, self.cycle_mult, self.eta_min = cycle_steps, cycle_epochs, cycle_mult, eta_min

    def build(self, optimizer, state, steps):
        cycle = to_steps(self.cycle_steps, self.cycle_epochs, state.steps_per_epoch, "cosine_restarts_lr.cycle")
        if cycle < 1:
            raise ConfigError(f"cosine_restarts_lr: the first cycle must last 1 step or more, got {cycle}.")
        # CosineAnnealingWarmRestarts' curve, with group floors
        return cosine_scheduler(optimizer, self.eta_min, cycle, self.cycle_mult)


@register("onecycle_lr")
class OneCycleLR(LRSchedule):
    """The 1cycle policy (Smith & Topin, https://arxiv.org/abs/1708.07120): up to the optimizer's LR (the peak)
    over `pct_start` of the run, then down to peak / (div_factor · final_div_factor); momentum cycles inversely.

    `total_steps` defaults to the run's steps after warmup; a smaller value would overrun and is refused.
    """

    def __init__(self, pct_start: float = 0.3, div_factor: float = 25.0, final_div_factor: float = 1e4,
                 anneal_strategy: Literal["cos", "linear"] = "cos", cycle_momentum: bool = True,
                 total_steps: int | None = None, warmup_steps: int | None = None, warmup_epochs: float | None = None):
        super().__init__(warmup_steps, warmup_epochs)
        self.pct_start, self.div_factor, self.final_div_factor = pct_start, div_factor, final_div_factor
        self.anneal_strategy, self.cycle_momentum, self.total_steps = anneal_strategy, cycle_momentum, total_steps

    def build(self, optimizer, state, steps):
        total = self.total_steps or steps
        if total < steps:
            raise ConfigError(f"onecycle_lr: total_steps={total} is shorter than the run ({steps} steps after "
                              "warmup); torch's OneCycleLR would fail mid-run. Leave total_steps unset.")
        peaks = [group.get("initial_lr", group["lr"]) for group in optimizer.param_groups]  # before any warmup
        return lr_scheduler.OneCycleLR(optimizer, peaks, total_steps=total, pct_start=self.pct_start,
                                       anneal_strategy=self.anneal_strategy, cycle_momentum=self.cycle_momentum,
                                       div_factor=self.div_factor, final_div_factor=self.final_div_factor)


@register("plateau_lr")
class PlateauLR(LRSchedule):
    """Multiply the LR by `factor` when the validation `metric` has not improved for `patience` epochs, down to
    `min_lr` (the base group's floor; a layer-wise group's is min_lr × its lr_scale)."""

    per_step = False

    def __init__(self, metric: str = "val/loss", mode: Literal["min", "max"] = "min", factor: float = 0.1,
                 patience: int = 2, threshold: float = 1e-4, min_lr: float = 0.0,
                 warmup_steps: int | None = None, warmup_epochs: float | None = None):
        super().__init__(warmup_steps, warmup_epochs)
        self.metric, self.mode, self.factor, self.patience = metric, mode, factor, patience
        self.threshold, self.min_lr = threshold, min_lr

    def build(self, optimizer, state, steps):
        return lr_scheduler.ReduceLROnPlateau(optimizer, self.mode, self.factor, self.patience, self.threshold,
                                              min_lr=group_floors(optimizer, self.min_lr))

    def fit_start(self, state: TrainState) -> None:
        state.require_validation(self.name, self.metric)
        super().fit_start(state)
        if not self.warmup:
            self.after_warmup = self.scheduler

    def epoch_end(self, state: TrainState) -> None:
        if state.step > self.warmup and state.validated_now:
            self.after_warmup.step(state.validation_metric(self.name, self.metric))

    def state_dict(self) -> dict[str, Any]:
        return {"scheduler": self.scheduler.state_dict(), "after_warmup": self.after_warmup.state_dict()}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self.scheduler.load_state_dict(state_dict["scheduler"])
        self.after_warmup.load_state_dict(state_dict["after_warmup"])
