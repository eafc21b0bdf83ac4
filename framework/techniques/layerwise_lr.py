"""Discriminative / layer-wise learning rates (ULMFiT, https://arxiv.org/abs/1801.06146; layer decay as in BEiT and
timm, https://arxiv.org/abs/2106.08254), and no weight decay on norms and biases.

Hook: `before_prepare` (regroups the optimizer's parameters before accelerate wraps it). Every schedule then
scales each group from its own LR, so the ratios hold throughout training.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping

import torch
from torch import nn

from framework.errors import ConfigError
from framework.state import TrainState
from framework.technique import Technique, register


def block_container(model: nn.Module, path: str | None = None) -> nn.Module | None:
    """The model's sequence of blocks: `path` (e.g. "blocks"), or else the largest Sequential / ModuleList made of
    two or more blocks of one class (a ResNet's residual blocks, a transformer's layers)."""
    if path is not None:
        return model.get_submodule(path)

    def repeated_blocks(container: nn.Module) -> bool:
        kinds = [type(child) for child in container.children() if any(True for _ in child.parameters())]
        return len(kinds) >= 2 and len(set(kinds)) == 1

    candidates = [m for m in model.modules() if isinstance(m, (nn.Sequential, nn.ModuleList)) and repeated_blocks(m)]
    return max(candidates, key=lambda m: sum(p.numel() for p in m.parameters()), default=None)


def parameter_depths(model: nn.Module, blocks: str | None = None) -> tuple[dict[str, int], int]:
    """Depth of every parameter: 0 before the blocks (stem), i + 1 in block i, n + 1 after them (head). Also n + 2,
    the number of depths."""
    container = block_container(model, blocks)
    owner = {}
    if container is not None:
        for index, child in enumerate(container.children()):
            for parameter in child.parameters():
                owner[id(parameter)] = index + 1
    count = len(list(container.children())) if container is not None else 0
    depths, seen_blocks = {}, False
    for name, parameter in model.named_parameters():
        if id(parameter) in owner:
            depths[name], seen_blocks = owner[id(parameter)], True
        else:
            depths[name] = count + 1 if seen_blocks else 0
    return depths, count + 2


def parameter_groups(model: nn.Module, lr: float, weight_decay: float, lr_multipliers: Mapping[str, float] = {},
                     layer_decay: float | None = None, no_decay_on_norm_and_bias: bool = True,
                     blocks: str | None = None) -> list[dict]:
    """Optimizer parameter groups: LR = lr × layer_decay^(distance from the top) × the first matching pattern's
    multiplier (fnmatch on parameter names, e.g. "head.*"); weight decay 0 for 1-D parameters (biases, norms)."""
    depths, count = parameter_depths(model, blocks)
    groups: dict[tuple[float, float], dict] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        scale = layer_decay ** (count - 1 - depths[name]) if layer_decay is not None else 1.0
        scale *= next((m for pattern, m in lr_multipliers.items() if fnmatch.fnmatch(name, pattern)), 1.0)
        decay = 0.0 if no_decay_on_norm_and_bias and parameter.ndim <= 1 else weight_decay
        group = groups.setdefault((scale, decay), {"params": [], "names": [], "lr": lr * scale, "lr_scale": scale,
                                                   "weight_decay": decay})
        group["params"].append(parameter)
        group["names"].append(name)
    return list(groups.values())


@register("layerwise_lr")
class LayerwiseLR(Technique):
    """Give parameter groups their own LRs (name patterns, layer decay) and no weight decay on norms and biases.

    Args:
        lr_multipliers: {fnmatch pattern: LR multiplier}, first match wins, e.g. {"head.*": 10.0}.
        layer_decay: each block below the top trains with this factor less LR (e.g. 0.75); null: no decay.
        no_decay_on_norm_and_bias: weight decay 0 for 1-D parameters.
        blocks: the attribute path of the model's block sequence (default: found automatically).
    """

    example_args = {"layer_decay": 0.75}

    def __init__(self, lr_multipliers: dict[str, float] | None = None, layer_decay: float | None = None,
                 no_decay_on_norm_and_bias: bool = True, blocks: str | None = None):
        if layer_decay is not None and not 0.0 < layer_decay <= 1.0:
            raise ConfigError(f"layerwise_lr.layer_decay must be within (0, 1], got {layer_decay}.")
        self.lr_multipliers, self.layer_decay = dict(lr_multipliers or {}), layer_decay
        self.no_decay_on_norm_and_bias, self.blocks = no_decay_on_norm_and_bias, blocks

    def before_prepare(self, state: TrainState) -> None:
        optimizer = state.optimizer
        if len(optimizer.param_groups) != 1:
            raise ConfigError("layerwise_lr builds the parameter groups itself: give it an optimizer with one group.")
        group = optimizer.param_groups[0]
        groups = parameter_groups(state.model, group["lr"], group.get("weight_decay", 0.0), self.lr_multipliers,
                                  self.layer_decay, self.no_decay_on_norm_and_bias, self.blocks)
        # Same optimizer, regrouped: its other settings (betas, momentum, ...) fill each new group from its defaults.
        optimizer.param_groups.clear()
        for new_group in groups:
            optimizer.add_param_group(new_group)
