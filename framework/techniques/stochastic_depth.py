"""Stochastic depth (Huang et al., https://arxiv.org/abs/1603.09382): in training, skip each residual block for a
random subset of the samples, so the network trains as an ensemble of shallower ones; evaluation uses every block.

The model marks its residual branches with `framework.nn.drop_path.DropPath` (the reference ResNet and GPT do); this
technique sets their drop probabilities with the paper's linear decay rule, the deepest block dropping most.

torchvision's models that have stochastic depth (ConvNeXt, EfficientNet v1/v2, Swin, MaxViT) carry their own
`torchvision.ops.StochasticDepth` modules, whose rates the model's constructor already spread over depth
(`stochastic_depth_prob` times a block's position: linear over all blocks in ConvNeXt, EfficientNet and Swin, per
layer in MaxViT). For those this technique keeps each module's ratio to the largest of them and scales them so the
largest is `rate`: the model's own depth rule, driven by `rate`. A model built with stochastic_depth_prob=0 has no
ratios left to keep; its modules get the linear rule above, in module order. Models with neither kind of module
(torchvision's ResNet, VGG, MobileNet, ViT; transformers models) are refused before training, naming the class. With
`schedule: linear` the rates grow from 0 in the first epoch to full in the last, as NASNet's ScheduledDropPath
(Zoph et al., https://arxiv.org/abs/1707.07012).

Hooks: `fit_start` (find the DropPath / StochasticDepth layers), `epoch_start` (set and log the rates).
"""

from __future__ import annotations

import math
from typing import Literal

from torch import nn
from torchvision.ops import StochasticDepth as TorchvisionStochasticDepth

from framework.errors import ConfigError, require
from framework.nn.drop_path import DropPath
from framework.state import TrainState
from framework.technique import Technique, register


def depth_rates(rate: float, num_blocks: int) -> list[float]:
    """The linear decay rule: block l of L (counting from 1 at the input) drops with p_l = rate · l / L.

    The first block, whose features every later block builds on, drops least; the last drops `rate`.
    """
    return [rate * block / num_blocks for block in range(1, num_blocks + 1)]


def scaled_rates(rate: float, model_rates: list[float]) -> list[float]:
    """The model's own rates scaled so that the largest is `rate` (each keeps its ratio to the largest); all-zero
    rates (nothing to keep) get `depth_rates(rate, len(model_rates))` instead."""
    largest = max(model_rates, default=0.0)
    if largest <= 0.0:
        return depth_rates(rate, len(model_rates))
    return [rate * p / largest for p in model_rates]


def drop_layers(model: nn.Module) -> tuple[list[nn.Module], list[float] | None]:
    """The model's drop-path layers, in module order: the framework's `DropPath` layers (and None), else torchvision's
    `StochasticDepth` modules and the rates the model was built with (the depth rule to keep)."""
    own = [module for module in model.modules() if isinstance(module, DropPath)]
    if own:
        return own, None
    torchvision_layers = [module for module in model.modules() if isinstance(module, TorchvisionStochasticDepth)]
    return torchvision_layers, [layer.p for layer in torchvision_layers]


@register("stochastic_depth")
class StochasticDepth(Technique):
    """Set the drop probability of every `DropPath` (or torchvision `StochasticDepth`) in the model, rising with depth.

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
        self._layers: list[nn.Module] = []
        self._model_rates: list[float] | None = None  # torchvision's: the rates the model was built with
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
        # The model's own rates are read here, once: epoch_start overwrites them.
        self._layers, self._model_rates = drop_layers(state.model)
        if not self._layers:  # e.g. torchvision's ResNet or a transformers model: no residual branch to drop
            name = type(state.accelerator.unwrap_model(state.model)).__name__
            raise ConfigError(
                f"stochastic_depth: {name} has no DropPath modules (nor torchvision.ops.StochasticDepth ones, as "
                "ConvNeXt, EfficientNet and Swin have), so there is nothing to drop. Put a "
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
        rates = depth_rates(self._current, len(self._layers)) if self._model_rates is None else \
            scaled_rates(self._current, self._model_rates)
        for layer, p in zip(self._layers, rates):
            layer.p = p  # DropPath and torchvision's StochasticDepth both read `p`
        state.log(**{"stochastic_depth/rate": self._current})  # on the epoch's first log line
