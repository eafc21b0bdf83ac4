"""Gradual unfreezing (ULMFiT, https://arxiv.org/abs/1801.06146): fine-tune the new head (and whatever else is not
frozen) first, then train the frozen parameters too from a given epoch.

Why not `requires_grad=False` and flip it later: DDP builds its gradient reducer, and DeepSpeed its (partitioned)
optimizer, from the parameters that require grad when they wrap the model; a parameter switched on later is never
all-reduced (the ranks drift apart) or never stepped. So the parameters stay trainable from the start, in the
optimizer and in DDP's reducer, and until the epoch this drops their gradients (`grad = None`) before anything reads
them. A torch optimizer skips a parameter without a gradient entirely: no step, no weight decay (AdamW's decoupled
decay would otherwise still shrink it), no momentum or Adam moments built up from gradients it never applied.
Gradient clipping and the gradient norm skip it too, so until the epoch the run trains exactly like one with those
parameters at requires_grad=False. The cost: their gradients are still computed in the frozen epochs.

DeepSpeed keeps gradients in its own buffers (a parameter's `.grad` is not what it steps) and FSDP flattens
parameters, so there the technique refuses to run; freeze for the whole run instead (requires_grad=False).

List it first among the techniques: it must drop the gradients before the others' `before_optimizer_step` reads
them (clipping, centralization, gradient-flow plots). BatchNorm layers among the frozen parameters still update their
running statistics in training mode, as with requires_grad=False.

Hook: `before_prepare` (find the parameters by name on the raw model), `before_optimizer_step` (drop their
gradients while `state.epoch` < the unfreeze epoch).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from framework.backend import Backend
from framework.errors import ConfigError, IncompatibleError
from framework.state import TrainState
from framework.technique import Technique


def drop_gradients_(parameters: Iterable[torch.Tensor]) -> None:
    """Set `.grad = None` on `parameters`: optimizers, clipping and gradient norms then skip them."""
    for parameter in parameters:
        parameter.grad = None


class FreezeUntil(Technique):
    """Keep the named parameters unchanged until `epoch` (counted from 0), then train them like the others.

    Args:
        names: parameter names of the raw model (`model.named_parameters()`, before any wrapper).
        epoch: the first epoch in which they train (≥ 1).
    """

    def __init__(self, names: Sequence[str], epoch: int):
        if not names:
            raise ConfigError("an unfreeze epoch needs parameters to freeze: set model.freeze to name patterns.")
        if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 1:
            raise ConfigError(f"the unfreeze epoch must be an integer ≥ 1 (epochs count from 0), got {epoch!r}; "
                              f"for no freezing at all leave model.freeze empty.")
        self.names, self.epoch = list(names), epoch
        self._parameters: list[torch.Tensor] = []

    def check(self, backend: Backend, others: Sequence[Technique]) -> None:
        engine = {"DEEPSPEED": "DeepSpeed", "FSDP": "FSDP"}.get(backend.distributed_type)
        if engine is not None:
            raise IncompatibleError(
                f"an unfreeze epoch needs the gradients in each parameter's .grad, which {engine} "
                f"keeps in its own buffers: drop model.unfreeze_epoch (freeze for the whole run) or launch with "
                f"cpu.yaml / multi_cpu.yaml / a DDP config.")

    def before_prepare(self, state: TrainState) -> None:
        named = dict(state.model.named_parameters())
        unknown = [name for name in self.names if name not in named]
        if unknown:
            raise ConfigError(f"freeze: {unknown[:3]} are not parameters of {type(state.model).__name__}.")
        self._parameters = [named[name] for name in self.names]  # the same tensors DDP / compile wrap later

    def before_optimizer_step(self, state: TrainState) -> None:
        if state.epoch < self.epoch:
            drop_gradients_(self._parameters)
