"""Augmentation pipelines from the config, built from torchvision v2 transforms.

    data:
      augment:                      # applied in this order, after the crop/resize to the training size
        random_resized_crop: {scale: [0.8, 1.0]}   # replaces the plain resize when listed
        horizontal_flip: {}
        rotation: {degrees: 10}
        color_jitter: {brightness: 0.3, contrast: 0.3}
        random_grayscale: {p: 0.1}
        auto_augment: {policy: cifar10}            # or imagenet, svhn
        rand_augment: {num_ops: 2, magnitude: 9}
        trivial_augment: {}
        random_erasing: {p: 0.25}                  # always last: it erases on the normalised tensor

Training: [random resized crop, or resize + center crop] -> listed augmentations -> float in [0, 1] -> normalise -> [random erasing].
Evaluation: resize to image_size / eval_crop_fraction -> center crop image_size -> float -> normalise.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torchvision.transforms import v2

from framework.errors import ConfigError

#: name -> (torchvision v2 transform, default arguments). The defaults are the usual ones for small images.
AUGMENTATIONS: dict[str, tuple[type, dict[str, Any]]] = {
    "random_resized_crop": (v2.RandomResizedCrop, {"scale": (0.35, 1.0)}),
    "horizontal_flip": (v2.RandomHorizontalFlip, {}),
    "rotation": (v2.RandomRotation, {"degrees": 15}),
    "color_jitter": (v2.ColorJitter, {"brightness": 0.4, "contrast": 0.4, "saturation": 0.4}),
    "random_grayscale": (v2.RandomGrayscale, {"p": 0.1}),
    "auto_augment": (v2.AutoAugment, {"policy": "imagenet"}),
    "rand_augment": (v2.RandAugment, {}),
    "trivial_augment": (v2.TrivialAugmentWide, {}),
    "random_erasing": (v2.RandomErasing, {"p": 0.25}),
}


def make_augmentation(name: str, args: Mapping[str, Any] | None, image_size: int | None = None) -> v2.Transform:
    """One configured augmentation; unknown names and bad arguments raise a ConfigError naming them."""
    if name not in AUGMENTATIONS:
        raise ConfigError(f"data.augment.{name}: unknown augmentation. Available: {', '.join(AUGMENTATIONS)}.")
    transform_class, defaults = AUGMENTATIONS[name]
    kwargs = {**defaults, **(args or {})}
    if name == "auto_augment" and isinstance(kwargs["policy"], str):
        policies = {p.value: p for p in v2.AutoAugmentPolicy}
        if kwargs["policy"] not in policies:
            raise ConfigError(f"data.augment.auto_augment.policy {kwargs['policy']!r}: use one of {list(policies)}.")
        kwargs["policy"] = policies[kwargs["policy"]]
    if name == "random_resized_crop":
        kwargs["size"] = image_size
    for key in ("scale", "ratio", "degrees"):  # YAML gives lists where torchvision wants tuples
        if isinstance(kwargs.get(key), list):
            kwargs[key] = tuple(kwargs[key])
    try:
        return transform_class(**kwargs)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"data.augment.{name}: {error} (arguments given: {args or {}}; see "
                          f"torchvision.transforms.v2.{transform_class.__name__}).") from error


def train_pipeline(image_size: int, augment: Mapping[str, Mapping[str, Any] | None], mean: list[float],
                   std: list[float], normalize: bool = True) -> v2.Compose:
    """PIL image -> augmented float tensor (C, image_size, image_size)."""
    steps: list[v2.Transform] = [v2.ToImage()]
    if "random_resized_crop" in augment:
        steps.append(make_augmentation("random_resized_crop", augment["random_resized_crop"], image_size))
    else:
        steps += [v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size)]
    steps += [make_augmentation(name, args) for name, args in augment.items()
              if name not in ("random_resized_crop", "random_erasing")]
    steps.append(v2.ToDtype(torch.float32, scale=True))
    if normalize:
        steps.append(v2.Normalize(mean, std))
    if "random_erasing" in augment:
        steps.append(make_augmentation("random_erasing", augment["random_erasing"]))
    return v2.Compose(steps)


def eval_pipeline(image_size: int, mean: list[float], std: list[float], crop_fraction: float = 1.0,
                  normalize: bool = True) -> v2.Compose:
    """PIL image -> float tensor: resize so the center crop of `image_size` keeps `crop_fraction` of the side."""
    steps = [v2.ToImage(), v2.Resize(round(image_size / crop_fraction), antialias=True), v2.CenterCrop(image_size),
             v2.ToDtype(torch.float32, scale=True)]
    if normalize:
        steps.append(v2.Normalize(mean, std))
    return v2.Compose(steps)
