"""Gradient (activation) checkpointing as a technique (Chen et al., https://arxiv.org/abs/1604.06174): recompute
chosen blocks in backward instead of storing their activations, trading compute for activation memory.

The kernel, its policies (``full``, ``every_k``, ``selective``) and how the wrap keeps state_dict keys, DDP hooks,
random ops and BatchNorm statistics right are in framework/nn/checkpointing.py (models use it too); this plug-in
chooses the blocks from a config.

By default the blocks are found from the model (framework/nn/blocks.py): the layers a Hugging Face transformers
model declares in `_no_split_modules`, else the modules repeated in its stage containers (a torchvision ResNet's
BasicBlock / Bottleneck, ViT's EncoderBlock, ConvNeXt's CNBlock, EfficientNet's MBConv / FusedMBConv, MobileNet's
InvertedResidual, Swin's SwinTransformerBlock, the reference models' blocks). A transformers model's layers are
called with keyword arguments (attention mask, position embeddings, cache) that the wrap passes through. Their KV
cache is turned off while training (`config.use_cache`), as transformers' own checkpointing does: a checkpointed
layer that writes a cache would write it again when backward recomputes it, and training never reads it (it only
holds every layer's keys and values alive).

Hooks: ``before_prepare`` (wrap the raw model before DDP / DeepSpeed wrap it; turn off the KV cache), ``fit_end``
(give the model its `use_cache` setting back, for generation after training).
"""

from __future__ import annotations

from typing import Any, Literal

from torch import nn

from framework.errors import ConfigError
from framework.nn.blocks import block_classes
from framework.nn.checkpointing import check_policy, checkpoint_modules, describe_modules
from framework.state import TrainState
from framework.technique import Technique, register


def default_targets(model: nn.Module) -> list[str]:
    """The default targets, as class names: the repeated layers a transformers model declares in
    `_no_split_modules` (e.g. `LlamaDecoderLayer`), else the blocks repeated in the model's stage containers
    (`BasicBlock`, `Bottleneck`, `EncoderBlock`, `CNBlock`, `MBConv`, the reference GPT's `Block`; see
    framework/nn/blocks.py). Nested matches are left to the outermost one."""
    return [kind.__name__ for kind in block_classes(model)]


def disable_kv_cache(model: nn.Module) -> list[Any]:
    """Set `config.use_cache = False` on every module config of `model` that has it on (transformers models);
    return those configs, to switch back on later. Training builds no KV cache then."""
    configs: list[Any] = []
    for module in model.modules():
        config = getattr(module, "config", None)
        if getattr(config, "use_cache", False) is True and not any(config is seen for seen in configs):
            config.use_cache = False
            configs.append(config)
    return configs


@register("gradient_checkpointing")
class GradientCheckpointing(Technique):
    """Recompute blocks in backward instead of storing their activations (less memory, more time).

    Args:
        modules: class names (`Block`, `BasicBlock`) or fnmatch patterns on module names (`blocks.*`). Empty (the
            default): the layers a transformers model declares in `_no_split_modules` (its decoder layers), else
            the blocks repeated in the model's stage containers (torchvision's and the reference models' blocks).
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
        self._cache_configs: list[Any] = []

    def before_prepare(self, state: TrainState) -> None:
        model = state.model
        targets = self.modules or default_targets(model)
        if not targets:
            raise ConfigError(f"gradient_checkpointing: {type(model).__name__} declares no `_no_split_modules` and "
                              f"repeats no block in a Sequential / ModuleList to checkpoint by default; list the "
                              f"modules to wrap in `modules` ({describe_modules(model)}).")
        self.wrapped = checkpoint_modules(model, targets, self.policy, self.every_k)
        self._cache_configs += disable_kv_cache(model)  # (a second call finds them off already)
        state.summary["gradient_checkpointing"] = {"policy": self.policy, "every_k": self.every_k,
                                                   "modules": self.wrapped}

    def fit_end(self, state: TrainState) -> None:
        for config in self._cache_configs:  # generation after training may use the cache again
            config.use_cache = True
        self._cache_configs = []
