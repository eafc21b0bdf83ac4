"""A model's repeated blocks, found from its structure: what gradient checkpointing recomputes and what layer-wise LR
decay counts as depth.

    block_classes(torchvision.models.resnet18())       # [BasicBlock]
    find_blocks(torchvision.models.convnext_tiny())    # [("features.1.0", CNBlock), ..., ("features.7.2", CNBlock)]

The rule, in order:

1. declared: a transformers model names its repeated layers in `_no_split_modules` (those that must stay whole on
   one device, e.g. `LlamaDecoderLayer`); the declared classes it holds are its blocks.
2. structural: a block is a module repeated as siblings in a `Sequential` / `ModuleList` (a stage container: a
   torchvision ResNet's `layer1`, a ConvNeXt or Swin stage `features.1`, a ViT's `encoder.layers`, the reference
   models' `blocks`), holding at least two weight matrices or kernels (parameters of two or more dimensions). The
   second condition leaves out the small repeated pieces that are not blocks: a stem's conv-norm-activation, a
   Swin patch merging, a single Linear. Plain containers are stages, never blocks, and so is a Sequential subclass
   whose children are blocks (RegNet's `AnyStage`). A class found once is a block everywhere, so a stage of one
   block (EfficientNet-B0's first) is included.

This finds BasicBlock / Bottleneck (ResNet, ResNeXt, Wide ResNet), CNBlock (ConvNeXt), MBConv / FusedMBConv
(EfficientNet v1/v2), InvertedResidual (MobileNet v2/v3, ShuffleNet), SwinTransformerBlock(V2), EncoderBlock (ViT),
ResBottleneckBlock (RegNet), _DenseBlock (DenseNet), Fire (SqueezeNet), MaxVit's stages; and nothing in VGG, AlexNet,
GoogLeNet or Inception v3 (no repeated container of blocks: name their modules yourself).
"""

from __future__ import annotations

from collections import Counter

from torch import nn

_PLAIN_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _weight_tensors(module: nn.Module) -> int:
    """Parameters of two or more dimensions (Linear / conv weights, packed attention projections) in `module`."""
    return sum(1 for parameter in module.parameters() if parameter.dim() >= 2)


def declared_block_classes(model: nn.Module) -> list[type]:
    """The classes of `model`'s modules named in some module's `_no_split_modules` (transformers' declaration)."""
    declared = {name for m in model.modules() for name in (getattr(m, "_no_split_modules", None) or ())}
    return sorted({type(m) for m in model.modules() if type(m).__name__ in declared}, key=lambda c: c.__name__)


def repeated_block_classes(model: nn.Module) -> list[type]:
    """The classes repeated as siblings in a Sequential / ModuleList with ≥ 2 weight tensors each (rule 2 above)."""
    found: set[type] = set()
    for container in model.modules():
        if isinstance(container, (nn.Sequential, nn.ModuleList)):
            counts = Counter(type(child) for child in container.children()
                             if type(child) not in _PLAIN_CONTAINERS and _weight_tensors(child) >= 2)
            found.update(kind for kind, count in counts.items() if count >= 2)
    # A Sequential subclass made of blocks is a stage (RegNet's AnyStage): its blocks are finer, so keep those.
    stages = {type(m) for m in model.modules() if type(m) in found and isinstance(m, (nn.Sequential, nn.ModuleList))
              and any(type(child) in found for child in m.children())}
    return sorted(found - stages, key=lambda c: c.__name__)


def block_classes(model: nn.Module) -> list[type]:
    """The classes of `model`'s blocks: declared ones (transformers), else the structurally repeated ones."""
    return declared_block_classes(model) or repeated_block_classes(model)


def find_blocks(model: nn.Module, classes: list[type] | None = None) -> list[tuple[str, nn.Module]]:
    """`model`'s blocks (instances of `classes`, default `block_classes(model)`) as (name, module), in module order
    (input to output for a model built as a sequence); a block nested in another block is left to the outer one."""
    kinds = tuple(block_classes(model) if classes is None else classes)
    blocks: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if name and isinstance(module, kinds) and not any(name.startswith(f"{outer}.") for outer, _ in blocks):
            blocks.append((name, module))
    return blocks
