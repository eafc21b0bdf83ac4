"""Stochastic depth (Huang et al., https://arxiv.org/abs/1603.09382): in training, skip each residual block for a
random subset of the samples, so the network trains as an ensemble of shallower ones; evaluation uses every block.

The model marks its residual branches with `framework.nn.drop_path.DropPath` (the reference ResNet does); this
technique sets their drop probabilities with the paper's linear decay rule, the deepest block dropping most. With
`schedule: linear` the rates grow from 0 in the first epoch to full in the last, as NASNet's ScheduledDropPath
(Zoph et al., https://arxiv.org/abs/1707.07012).

Hooks: `fit_start` (find the DropPath layers), `epoch_start` (set and log the rates).
"""

from __future__ import annotations

import math
from typing import Literal

from framework.errors import ConfigError, require
from framework.nn.drop_path import DropPath
from framework.state import TrainState
from framework.technique import Technique, register


def depth_rates(rate: float, num_blocks: int) -> list[float]:
    """The linear decay rule: block l of L (counting from 1 at the input) drops with p_l = rate · l / L.

    The first block, whose features every later block builds on, drops least; the last drops `rate`.
    """
    return [rate * block / num_blocks for block in range(1, num_blocks + 1)]


@register("stochastic_depth")
class StochasticDepth(Technique):
    """Set the drop probability of every `DropPath` in the model, rising linearly with depth.

    Args:
        rate: the last block's drop probability (the paper uses 0.5 for 110-layer ResNets on CIFAR; small models
            want less).
        schedule: "constant" uses `rate` from the start; "linear" scales every rate from 0 in the first epoch up to
            full in the last epoch (a one-epoch run uses the full rate).
    """

    def __init__(self, rate: float = 0.1, schedule: Literal["constant", "linear"] = "constant"):
        require(0.0 <= rate < 1.0, f"stochastic_depth.rate must be within [0, 1), got {rate}.")
        require(schedule in ("constant", "linear"),
                f"stochastic_depth.schedule must be 'constant' or 'linear', got {schedule!r}.")
        self.rate = rate
        self.schedule = schedule
        self._layers: list[DropPath] = []
        self._current = 0.0

    def current_rate(self, state: TrainState) -> float:
        """The last block's drop probability in the current epoch (`state.epoch`, counted from 0)."""
        if self.schedule == "constant":
            return self.rate
        epochs = math.ceil(state.max_steps / max(state.steps_per_epoch, 1))
        if epochs <= 1:
            return self.rate
        return self.rate * min(state.epoch / (epochs - 1), 1.0)

    def fit_start(self, state: TrainState) -> None:
        # modules() walks through DDP / DeepSpeed / FSDP / torch.compile wrappers (all nn.Modules), in the order the
        # model defines its blocks: input to output for any model built as a sequence of blocks.
        self._layers = [module for module in state.model.modules() if isinstance(module, DropPath)]
        if not self._layers:  # e.g. a transformers model: its residual branches have no DropPath to set
            name = type(state.accelerator.unwrap_model(state.model)).__name__
            raise ConfigError(
                f"stochastic_depth: {name} has no DropPath modules, so there is nothing to drop. Put a "
                "`framework.nn.drop_path.DropPath()` on each residual branch of its blocks "
                "(`x + self.drop_path(branch(x))`), or remove stochastic_depth from the techniques."
            )

    def epoch_start(self, state: TrainState) -> None:
        # Per epoch, not per step: `p` is a plain Python float, and torch.compile guards on it, so every new value
        # recompiles the model. An epoch-wise schedule keeps recompiles to one per epoch at most (past
        # torch._dynamo.config.recompile_limit, 8, distinct values the model runs uncompiled: with `compile` and a
        # linear schedule over many epochs, raise that limit or use the constant schedule).
        # (On resume this runs after the checkpoint restored `state.epoch`, so the schedule picks up where it was.)
        self._current = self.current_rate(state)
        for layer, p in zip(self._layers, depth_rates(self._current, len(self._layers))):
            layer.p = p
        state.log(**{"stochastic_depth/rate": self._current})  # on the epoch's first log line
