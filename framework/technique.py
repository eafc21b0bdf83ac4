"""The plug-in contract: a `Technique` is an object with named hooks that the loop calls in a fixed order.

Per optimizer step the loop (framework/loop.py) calls, for every technique in the order they are listed:

    before_prepare(state)                             # before accelerate wraps model/optimizer: edit modules here
    fit_start(state)                                  # model on its device, wrapped; build shadows, schedules
      epoch_start(state)
        batch = on_batch(state, batch)                # Mixup / CutMix / progressive resize
        with accelerator.accumulate(model):
          outputs = task.forward(model, batch)
          loss = task.loss(outputs, batch)
          loss = on_loss(state, loss, batch, outputs)
          accelerator.backward(loss)
          after_backward(state)
          if accelerator.sync_gradients:
            before_optimizer_step(state)              # grads unscaled: clip, centralize, measure
            optimizer.step()  (or the step-owning technique's optimizer_step(state, recompute_gradients))
            after_optimizer_step(state)               # EMA update, per-step schedules
            optimizer.zero_grad()
        batch_end(state, logs)
      epoch_end(state)                                # per-epoch schedules, early stop, best checkpoint
      eval_start(state) ... eval_end(state)           # around every evaluation
    fit_end(state)

Hooks default to doing nothing; the loop only calls the hooks a technique overrides. `on_batch` and `on_loss`
return the new value instead of mutating hidden state. A technique with state implements `state_dict` /
`load_state_dict`; the loop registers it with `accelerator.register_for_checkpointing`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, ClassVar

from framework.errors import IncompatibleError

if TYPE_CHECKING:  # annotations only: the contract needs neither torch nor accelerate to be imported
    import torch

    from framework.backend import Backend
    from framework.state import TrainState

#: Every hook, in the order the loop first reaches it. `optimizer_step` is called only on a step-owning technique.
HOOKS: tuple[str, ...] = (
    "before_prepare",
    "fit_start",
    "epoch_start",
    "on_batch",
    "on_loss",
    "after_backward",
    "before_optimizer_step",
    "optimizer_step",
    "after_optimizer_step",
    "batch_end",
    "epoch_end",
    "eval_start",
    "eval_end",
    "fit_end",
)


class Technique:
    """Base class of every plug-in. Subclasses override only the hooks they need.

    Class attributes:
        name: the registered name used in configs (set by `@register`).
        owns_optimizer_step: True for the one technique that replaces `optimizer.step()` (e.g. SAM).
        sets_learning_rate: True for a technique that sets the optimizer's LR as training goes (an LR schedule);
            only one may, since two would multiply each other's LR.
        handles_nonfinite: True for a technique that recovers from non-finite losses and gradients itself (skips
            the step, rolls back): others that would stop the run on one (the doctor) leave that to it.
        example_args: arguments of a typical instance, when some are required.
    """

    name: ClassVar[str] = ""
    owns_optimizer_step: ClassVar[bool] = False
    sets_learning_rate: ClassVar[bool] = False
    handles_nonfinite: ClassVar[bool] = False
    #: Arguments for a typical instance, for techniques that have required ones (used by docs and the table).
    example_args: ClassVar[dict[str, Any]] = {}

    def check(self, backend: Backend, others: Sequence[Technique]) -> None:
        """Raise `IncompatibleError` (one sentence: the problem and the fix) if this cannot run here."""

    # --- hooks (all optional) ---------------------------------------------------------------------------------
    def before_prepare(self, state: TrainState) -> None: ...
    def fit_start(self, state: TrainState) -> None: ...
    def epoch_start(self, state: TrainState) -> None: ...
    def on_batch(self, state: TrainState, batch: Any) -> Any:
        return batch
    def on_loss(self, state: TrainState, loss: torch.Tensor, batch: Any, outputs: Any) -> torch.Tensor:
        return loss
    def after_backward(self, state: TrainState) -> None: ...
    def before_optimizer_step(self, state: TrainState) -> None: ...
    def optimizer_step(self, state: TrainState, recompute_gradients: Callable[[], torch.Tensor]) -> None:
        """Only for a step-owning technique: take the optimizer step. `recompute_gradients()` zeroes the gradients,
        runs forward and backward again on the same batch (plus the other techniques' `before_optimizer_step`,
        e.g. clipping) and returns the loss."""
    def after_optimizer_step(self, state: TrainState) -> None: ...
    def batch_end(self, state: TrainState, logs: dict[str, Any]) -> None: ...
    def epoch_end(self, state: TrainState) -> None: ...
    def eval_start(self, state: TrainState) -> None: ...
    def eval_end(self, state: TrainState) -> None: ...
    def fit_end(self, state: TrainState) -> None: ...

    def lr_schedulers(self) -> list[Any]:
        """The torch LR schedulers this technique steps (a rollback or a changed LR on resume rescales them)."""
        return []

    def test_weights(self, state: TrainState) -> Mapping[str, AbstractContextManager]:
        """Other weights the test split is also evaluated on at the end, by metric prefix (e.g. "test_best"): each a
        context manager that swaps them into the model and back. They are the weights an evaluation already ran on,
        so the eval hooks (EMA's swap) are not called around them. Every rank must return the same prefixes."""
        return {}

    def evaluated_weights(self, state: TrainState) -> dict[str, torch.Tensor] | None:
        """The weights evaluation runs on, when this technique swaps weights of its own in for it (EMA's average),
        as one full state dict on the main process; None when evaluation runs on the model's own weights. Every rank
        calls it (gathering may be collective). Best-model saving keeps these weights."""
        return None

    def deepspeed_config(self) -> dict[str, Any]:
        """Entries this technique sets in a DeepSpeed config, whose engine owns clipping and the optimizer step."""
        return {}

    # --- checkpointed state (override both, or neither) -------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        pass

    # --- introspection used by the loop -------------------------------------------------------------------------
    def overrides(self, hook: str) -> bool:
        """True if this technique's class replaces the base class's `hook`."""
        return getattr(type(self), hook) is not getattr(Technique, hook)

    @property
    def has_state(self) -> bool:
        return self.overrides("state_dict")

    def __repr__(self) -> str:  # the constructor arguments only (not shadow weights or other state)
        names = inspect.signature(type(self)).parameters
        args = ", ".join(f"{k}={getattr(self, k)!r}" for k in names if hasattr(self, k))
        return f"{type(self).__name__}({args})"


def hook_table(techniques: Sequence[Technique]) -> dict[str, list]:
    """For each hook, the bound methods of the techniques that override it, in list order.

    The loop calls only these, so a technique costs nothing on the hooks it does not use.
    """
    return {hook: [getattr(t, hook) for t in techniques if t.overrides(hook)] for hook in HOOKS}


def check_techniques(techniques: Sequence[Technique], backend: Backend) -> None:
    """Run every technique's `check` plus the contract's own rules; raise the first problem found."""
    names = [t.name or type(t).__name__ for t in techniques]
    step_owners = [n for t, n in zip(techniques, names) if t.owns_optimizer_step]
    if len(step_owners) > 1:
        raise IncompatibleError(
            f"techniques {step_owners} each replace the optimizer step; only one can. Remove all but one of them."
        )
    if step_owners and backend.distributed_type == "DEEPSPEED":
        raise IncompatibleError(
            f"{step_owners[0]} replaces the optimizer step, but under DeepSpeed the engine steps inside backward. "
            "Use a DDP launch config (multi_cpu.yaml, ddp.yaml) or remove it."
        )
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise IncompatibleError(f"technique(s) {duplicated} are listed twice; list each technique once.")
    lr_setters = [n for t, n in zip(techniques, names) if t.sets_learning_rate]
    if len(lr_setters) > 1:
        raise IncompatibleError(
            f"techniques {lr_setters} each set the learning rate, and together they would multiply each other's LR; "
            "keep one LR schedule (each takes warmup_steps / warmup_epochs for a warmup)."
        )
    for technique in techniques:
        others = [t for t in techniques if t is not technique]
        technique.check(backend, others)


# --- registry: only registered techniques can be built from a config (framework.config.build_techniques) ----------
TECHNIQUES: dict[str, type[Technique]] = {}


def register(name: str):
    """Class decorator: make a technique buildable from configs as `techniques: {name: {arg: value}}`."""

    def decorate(cls: type[Technique]) -> type[Technique]:
        if name in TECHNIQUES and TECHNIQUES[name] is not cls:
            raise ValueError(f"technique name {name!r} is already registered by {TECHNIQUES[name].__name__}")
        cls.name = name
        TECHNIQUES[name] = cls
        return cls

    return decorate
