"""Gradient (activation) checkpointing as a technique (Chen et al., https://arxiv.org/abs/1604.06174): recompute
chosen blocks in backward instead of storing their activations, trading compute for activation memory.

The kernel, its policies (``full``, ``every_k``, ``selective``) and how the wrap keeps state_dict keys, DDP hooks,
random ops and BatchNorm statistics right are in framework/nn/checkpointing.py (models use it too); this plug-in
chooses the blocks from a config.

Hook: ``before_prepare`` (wrap the raw model before DDP / DeepSpeed wrap it).
"""

from __future__ import annotations

from typing import Literal

from torch import nn

from framework.errors import ConfigError
from framework.nn.checkpointing import check_policy, checkpoint_modules, describe_modules
from framework.state import TrainState
from framework.technique import Technique, register


def default_targets(model: nn.Module) -> list[str]:
    """The default targets: the names of the model's classes that end with "Block" (the reference GPT's `Block`,
    the ResNet's `BasicBlock`, timm's ViT `Block`). Nested matches are left to the outermost one."""
    return sorted({type(m).__name__ for m in model.modules() if type(m).__name__.endswith("Block")})


@register("gradient_checkpointing")
class GradientCheckpointing(Technique):
    """Recompute blocks in backward instead of storing their activations (less memory, more time).

    Args:
        modules: class names (`Block`, `BasicBlock`) or fnmatch patterns on module names (`blocks.*`). Empty (the
            default): every module whose class name ends with "Block", the repeated blocks of the reference models.
        policy: "full" (recompute every block), "every_k" (every k-th block: half the saving and half the cost at
            k=2), or "selective" (keep matmul outputs, recompute the cheap ops: most of the time back).
        every_k: k for "every_k".
    """

    def __init__(self, modules: list[str] | None = None, policy: Literal["full", "every_k", "selective"] = "full",
                 every_k: int = 2):
        check_policy(policy, every_k)
        self.modules = list(modules or [])
        self.policy = policy
        self.every_k = every_k
        self.wrapped: list[str] = []

    def before_prepare(self, state: TrainState) -> None:
        model = state.model
        targets = self.modules or default_targets(model)
        if not targets:
            raise ConfigError(f"gradient_checkpointing: {type(model).__name__} has no module class ending in 'Block' "
                              f"to checkpoint by default; list the modules to wrap in `modules` "
                              f"({describe_modules(model)}).")
        self.wrapped = checkpoint_modules(model, targets, self.policy, self.every_k)
        state.summary["gradient_checkpointing"] = {"policy": self.policy, "every_k": self.every_k,
                                                   "modules": self.wrapped}
