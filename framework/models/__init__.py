"""Reference models, and how a finished run's model is described and rebuilt from its files alone."""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from framework.errors import ConfigError
from framework.models.resnet import ResNet, ResNetConfig
from framework.models.vision import build_torchvision_model

#: Models `model_description` / `build_model` know: class name -> (class, its config dataclass).
MODELS: dict[str, tuple[type[nn.Module], type]] = {"ResNet": (ResNet, ResNetConfig)}


def model_description(model: nn.Module, config: Any) -> dict[str, Any]:
    """What `build_model` needs to rebuild `model` (written as a run's model.json): its class and config; for a
    torchvision model (a config with a `name`) also what `build_torchvision_model` takes."""
    description = {"class": type(model).__name__, "config": dataclasses.asdict(config)}
    if getattr(config, "name", None):  # torchvision's classes (ResNet, ...) may share a name with the reference ones
        description["torchvision"] = {"name": config.name, "in_channels": config.in_channels,
                                      "num_classes": config.num_classes, "small_input": config.small_input}
    return description


def build_model(description: dict[str, Any]) -> nn.Module:
    """The model a run's model.json describes, freshly initialised (load its weights next)."""
    if "torchvision" in description:
        return build_torchvision_model(**description["torchvision"])
    name = description.get("class")
    if name not in MODELS:
        raise ConfigError(f"model.json names model class {name!r}, which framework.models cannot build; known: "
                          f"{', '.join(sorted(MODELS))}.")
    model_class, config_class = MODELS[name]
    fields = {f.name: f.type for f in dataclasses.fields(config_class)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in description["config"].items() if k in fields}
    return model_class(config_class(**values))
