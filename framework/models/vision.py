"""torchvision's classification models by name, and fine-tuning from weights on local disk.

    build_torchvision_model("resnet18", in_channels=1, num_classes=10, small_input=True)
    load_weights(model, "resnet18_imagenet.pth")  # -> names of the tensors left at their fresh init (the new head)

Nothing is downloaded: models are built with `weights=None`, and weights come from a file the user names, read as
tensors only (safetensors, or `torch.load(..., weights_only=True)`: never an unrestricted unpickle).
"""

from __future__ import annotations

import difflib
import fnmatch
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torchvision
from torch import nn

from framework.errors import ConfigError
from framework.models.resnet import ResNetConfig


@dataclass
class ImageModelConfig(ResNetConfig):
    """Model: the reference ResNet (name null), or a torchvision classification model by name; optional weights."""

    name: str | None = None
    """A torchvision classification model (resnet18, convnext_tiny, vit_b_16, ...); null: the reference ResNet
    (widths, blocks_per_stage and zero_init_residual apply to it only)."""
    small_input: bool = False
    """For small images (CIFAR, digits): a 3×3 stride-1 stem without the max-pool (torchvision ResNet family)."""
    weights: str | None = None
    """Fine-tune from a local .safetensors file or torchvision .pth state dict; a head of another class count stays
    freshly initialised."""
    freeze: list[str] = field(default_factory=list)
    """fnmatch patterns of parameter names not to train (e.g. "conv1.*", "layer1.*"), frozen for the whole run
    unless unfreeze_epoch is set."""
    unfreeze_epoch: int | None = None
    """The epoch (from 0) from which the `freeze` parameters train too; null: frozen for the whole run. Not under
    DeepSpeed or FSDP (see framework/techniques/freeze.py)."""

    def __post_init__(self) -> None:
        if self.unfreeze_epoch is not None and (not self.freeze or isinstance(self.unfreeze_epoch, bool)
                                                or self.unfreeze_epoch < 1):
            raise ConfigError(f"model.unfreeze_epoch {self.unfreeze_epoch!r} needs model.freeze patterns and an "
                              f"epoch ≥ 1 (epochs count from 0); set both, or leave unfreeze_epoch null.")


def classification_models() -> list[str]:
    """The names `torchvision.models.get_model` builds as image classifiers (not detection, segmentation, video)."""
    return torchvision.models.list_models(module=torchvision.models)


def build_torchvision_model(name: str, in_channels: int, num_classes: int, small_input: bool = False) -> nn.Module:
    """torchvision's classification model `name`, freshly initialised, for `in_channels`-channel images and
    `num_classes` classes; `small_input`: a ResNet with a 3×3 stride-1 stem and no max-pool."""
    known = classification_models()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}?" if close else \
            "see torchvision.models.list_models(module=torchvision.models)."
        raise ConfigError(f"model.name {name!r} is not a torchvision classification model; {hint}")
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    if small_input:
        if not isinstance(model, torchvision.models.ResNet):
            raise ConfigError(f"model.small_input is implemented for torchvision's ResNet family (resnet*, resnext*, "
                              f"wide_resnet*), not {name!r}: set model.small_input false, or use larger images "
                              f"(data.image_size) or a ResNet.")
        # CIFAR ResNets: a 7×7 stride-2 stem and a max-pool would shrink a 32×32 image to 8×8 before the first stage.
        model.conv1 = nn.Conv2d(in_channels, model.conv1.out_channels, 3, 1, 1, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")  # as torchvision inits it
        model.maxpool = nn.Identity()
    if in_channels != 3:
        _adapt_input_channels(model, in_channels)
    return model


def _adapt_input_channels(model: nn.Module, in_channels: int) -> None:
    """Replace the first Conv2d that takes 3 channels (the stem: ResNet's conv1, ViT's conv_proj, ...) by one that
    takes `in_channels`, with the same shape otherwise."""
    for name, conv in model.named_modules():
        if isinstance(conv, nn.Conv2d) and conv.in_channels == 3:
            new = nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                            conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode)
            parent_name, _, attribute = name.rpartition(".")
            setattr(model.get_submodule(parent_name), attribute, new)
            return
    # Nothing to replace: the stem already takes in_channels (small_input built it so) or the model has no Conv2d.


def _strip_wrappers(name: str) -> str:
    """A tensor name without the prefixes DDP (`module.`) and torch.compile (`_orig_mod.`) add."""
    return name.removeprefix("module.").replace("_orig_mod.", "")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors file or a .pth/.pt state dict, read as tensors only."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"model.weights: {str(path)!r} is not a file; give a .safetensors file or a .pth state dict "
                          f"saved on this machine (nothing is downloaded).")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # tensors only, never arbitrary objects
    except Exception as error:  # pickle.UnpicklingError for a whole pickled model; others for a broken file
        raise ConfigError(f"model.weights: {str(path)!r} is not a state dict readable weights-only ({error}); save "
                          f"it with torch.save(model.state_dict(), path) or as .safetensors.") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):  # a training checkpoint around it
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"model.weights: {str(path)!r} does not hold a state dict (name -> tensor); save it with "
                          f"torch.save(model.state_dict(), path).")
    return state


def load_weights(model: nn.Module, path: str | Path) -> list[str]:
    """Load `path` into `model`: every tensor exactly, except a classifier head of another class count, which keeps
    its fresh initialisation. Returns the names of the tensors left at their fresh init."""
    saved = {_strip_wrappers(k): v for k, v in read_state_dict(path).items()}
    own = model.state_dict()
    # The head: the last Linear (torchvision's fc, classifier[-1], heads.head); only it may differ in class count.
    head = next((name for name, module in reversed(list(model.named_modules())) if isinstance(module, nn.Linear)), None)
    head_tensors = {f"{head}.weight", f"{head}.bias"} if head is not None else set()
    missing = sorted(own.keys() - saved.keys())
    unexpected = sorted(saved.keys() - own.keys())
    if missing or unexpected:
        raise ConfigError(f"model.weights {str(path)!r} does not fit the model: missing {missing[:5]}, unexpected "
                          f"{unexpected[:5]}; check model.name (and model.small_input) match the saved model.")
    fresh = []
    for name in own:
        if saved[name].shape == own[name].shape:
            continue
        # The head of another class count: (old, features) -> (new, features) for weight, (old,) -> (new,) for bias.
        if name in head_tensors and saved[name].shape[1:] == own[name].shape[1:]:
            fresh.append(name)
            continue
        raise ConfigError(f"model.weights: tensor {name!r} has shape {tuple(saved[name].shape)} in {str(path)!r} but "
                          f"{tuple(own[name].shape)} in the model; check model.name, model.small_input and the "
                          f"data's channels match the saved model.")
    model.load_state_dict({k: v for k, v in saved.items() if k not in fresh}, strict=False)
    return fresh


def frozen_names(model: nn.Module, patterns: list[str]) -> list[str]:
    """The names of the parameters matching any fnmatch pattern; a pattern that matches none is refused."""
    frozen = [name for name, _ in model.named_parameters()
              if any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)]
    unused = [pattern for pattern in patterns if not any(fnmatch.fnmatchcase(n, pattern) for n in frozen)]
    if unused:
        names = [name for name, _ in model.named_parameters()]
        raise ConfigError(f"model.freeze: {unused} match no parameter name; names look like {names[:3]} ... "
                          f"{names[-2:]}.")
    return frozen


def freeze(model: nn.Module, patterns: list[str]) -> list[str]:
    """Set requires_grad False on the parameters whose names match any fnmatch pattern; returns their names. Done
    before the optimizer and the accelerator see the model, so DDP and DeepSpeed leave them out too (for the whole
    run: to unfreeze later, framework.techniques.freeze.FreezeUntil keeps them trainable and drops their gradients)."""
    frozen = frozen_names(model, patterns)
    parameters = dict(model.named_parameters())
    for name in frozen:
        parameters[name].requires_grad_(False)
    return frozen
