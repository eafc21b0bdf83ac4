"""Discriminative / layer-wise learning rates (ULMFiT, https://arxiv.org/abs/1801.06146; layer decay as in BEiT and
timm, https://arxiv.org/abs/2106.08254).

Hook: `before_prepare` (regroups the optimizer's parameters before accelerate wraps it). Each parameter keeps the
weight decay its optimizer group gave it (`OptimizerConfig` leaves norms and biases undecayed by default). Every
schedule then scales each group from its own LR, and a schedule's floor (`eta_min`, `min_lr`) from the group's
`lr_scale`, so the ratios hold throughout training, down to the floor.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping

import torch
from torch import nn

from framework.errors import ConfigError, require
from framework.nn.blocks import find_blocks
from framework.state import TrainState
from framework.technique import Technique, register


def model_blocks(model: nn.Module, path: str | None = None) -> list[nn.Module]:
    """The model's blocks, input to output: the children of the container at `path` (e.g. "blocks",
    "encoder.layers"), or else the blocks framework/nn/blocks.py finds: the layers a transformers model declares,
    or the modules repeated in its stage containers, across all stages (a torchvision ResNet's 8 BasicBlocks of
    layer1-4, ConvNeXt's and EfficientNet's blocks of every `features` stage, ViT's encoder layers)."""
    if path is not None:
        return list(model.get_submodule(path).children())
    return [block for _, block in find_blocks(model)]


def parameter_depths(model: nn.Module, blocks: str | None = None) -> tuple[dict[str, int], int]:
    """Depth of every parameter: 0 before the first block (stem), i + 1 in block i, n + 1 after the last (head).
    Parameters between two blocks (a downsampling layer between stages) go with the block they feed. Also n + 2,
    the number of depths."""
    found = model_blocks(model, blocks)
    owner = {id(parameter): index + 1 for index, block in enumerate(found) for parameter in block.parameters()}
    depths: dict[str, int] = {}
    pending: list[str] = []  # parameters after some block whose depth is that of the next block (or the head)
    seen_blocks = False
    for name, parameter in model.named_parameters():
        if id(parameter) in owner:
            depth = owner[id(parameter)]
            for waiting in pending:
                depths[waiting] = depth
            pending, seen_blocks = [], True
            depths[name] = depth
        elif seen_blocks:
            pending.append(name)
        else:
            depths[name] = 0
    for waiting in pending:
        depths[waiting] = len(found) + 1
    return depths, len(found) + 2


def parameter_groups(model: nn.Module, lr: float, weight_decay: float | Callable[[torch.Tensor], float],
                     lr_multipliers: Mapping[str, float] = {}, layer_decay: float | None = None,
                     blocks: str | None = None) -> list[dict]:
    """Optimizer parameter groups: LR = lr × layer_decay^(distance from the top) × the first matching pattern's
    multiplier (fnmatch on parameter names, e.g. "head.*"), stored as `lr_scale` too; `weight_decay` for every
    parameter, or a function giving each parameter's."""
    depths, count = parameter_depths(model, blocks)
    decay_of = weight_decay if callable(weight_decay) else lambda parameter: weight_decay
    groups: dict[tuple[float, float], dict] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        scale = layer_decay ** (count - 1 - depths[name]) if layer_decay is not None else 1.0
        scale *= next((m for pattern, m in lr_multipliers.items() if fnmatch.fnmatch(name, pattern)), 1.0)
        decay = decay_of(parameter)
        group = groups.setdefault((scale, decay), {"params": [], "names": [], "lr": lr * scale, "lr_scale": scale,
                                                   "weight_decay": decay})
        group["params"].append(parameter)
        group["names"].append(name)
    return list(groups.values())


@register("layerwise_lr")
class LayerwiseLR(Technique):
    """Give parameter groups their own LRs (name patterns, layer decay); each parameter keeps its weight decay.

    The optimizer's groups must share one LR (the base LR); their weight decays (OptimizerConfig's no-decay split
    of norms and biases) carry over to the new groups.

    Args:
        lr_multipliers: {fnmatch pattern: LR multiplier}, first match wins, e.g. {"head.*": 10.0}.
        layer_decay: each block below the top trains with this factor less LR (e.g. 0.75); null: no decay.
        blocks: the attribute path of the model's block sequence (default: found from the model, across all its
            stages; see framework/nn/blocks.py).
    """

    example_args = {"layer_decay": 0.75}

    def __init__(self, lr_multipliers: dict[str, float] | None = None, layer_decay: float | None = None,
                 blocks: str | None = None):
        require(layer_decay is None or 0.0 < layer_decay <= 1.0,
                f"layerwise_lr.layer_decay must be within (0, 1], got {layer_decay}.")
        self.lr_multipliers, self.layer_decay, self.blocks = dict(lr_multipliers or {}), layer_decay, blocks

    def before_prepare(self, state: TrainState) -> None:
        optimizer = state.optimizer
        lrs = sorted({group["lr"] for group in optimizer.param_groups})
        if len(lrs) != 1:
            raise ConfigError(f"layerwise_lr sets the groups' LRs itself, but the optimizer's groups already have "
                              f"different LRs {lrs}: build it with one LR (OptimizerConfig.build(model)).")
        default_decay = optimizer.defaults.get("weight_decay", 0.0)  # for a parameter in no group
        decay_of = {id(p): group.get("weight_decay", 0.0) for group in optimizer.param_groups for p in group["params"]}
        groups = parameter_groups(state.model, lrs[0], lambda parameter: decay_of.get(id(parameter), default_decay),
                                  self.lr_multipliers, self.layer_decay, self.blocks)
        # Same optimizer, regrouped: its other settings (betas, momentum, ...) fill each new group from its defaults.
        optimizer.param_groups.clear()
        for new_group in groups:
            optimizer.add_param_group(new_group)
