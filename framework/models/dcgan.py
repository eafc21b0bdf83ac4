"""A DCGAN-style generator and critic (Radford et al. 2015) for WGAN-GP: strided (transposed) convolutions, batch norm
in the generator only (a per-sample gradient penalty is wrong with batch norm in the critic, which mixes the samples
of a batch: Gulrajani et al. 2017, section 4).

`WGAN` holds both, so the loop prepares, checkpoints and exports one model; `forward(mode=...)` runs what one update
needs, so under DDP each update is one forward of the wrapped model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from framework.errors import ConfigError


@dataclass
class DCGANConfig:
    """DCGAN generator and critic: noise size and width (image size and channels come from the data)."""

    noise_dim: int = 64
    """Size of the generator's input noise vector."""
    width: int = 32
    """Channels of the generator's last and the critic's first convolution; doubled at each 2x downsampling."""
    image_size: int = 16
    """Generated images are image_size x image_size: a power of two, at least 8 (the recipe sets it from the data)."""
    channels: int = 1
    """Image channels (the recipe sets it from the data)."""


def _stages(image_size: int) -> int:
    stages = math.log2(image_size / 4)
    if image_size < 8 or stages != int(stages):
        raise ConfigError(f"DCGAN image_size must be a power of two >= 8, got {image_size}; set data.image_size.")
    return int(stages)


class Generator(nn.Module):
    """Noise (B, noise_dim) -> images (B, C, S, S) in the data's normalized space: tanh gives pixels in [0, 1] (as
    (t + 1) / 2), then the data's per-channel mean and std are applied, so the critic sees fakes and reals alike."""

    def __init__(self, config: DCGANConfig, mean: list[float], std: list[float]):
        super().__init__()
        stages = _stages(config.image_size)
        channels = config.width * 2 ** stages
        self.project = nn.Sequential(nn.Linear(config.noise_dim, channels * 16, bias=False),
                                     nn.Unflatten(1, (channels, 4, 4)), nn.BatchNorm2d(channels), nn.ReLU(True))
        layers: list[nn.Module] = []
        for _ in range(stages):
            layers += [nn.ConvTranspose2d(channels, channels // 2, 4, 2, 1, bias=False), nn.BatchNorm2d(channels // 2),
                       nn.ReLU(True)]
            channels //= 2
        layers += [nn.Conv2d(channels, config.channels, 3, 1, 1), nn.Tanh()]
        self.upsample = nn.Sequential(*layers)
        self.register_buffer("mean", torch.tensor(mean).reshape(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).reshape(1, -1, 1, 1), persistent=False)

    def forward(self, noise: torch.Tensor) -> torch.Tensor:
        pixels = (self.upsample(self.project(noise)) + 1) / 2
        return (pixels - self.mean) / self.std

    def to_pixels(self, images: torch.Tensor) -> torch.Tensor:
        """Normalized images (real or generated) back to pixels in [0, 1], for pictures."""
        return (images * self.std + self.mean).clamp(0, 1)


class Critic(nn.Module):
    """Images (B, C, S, S) -> one unbounded score per image (B,); no batch norm, no sigmoid."""

    def __init__(self, config: DCGANConfig):
        super().__init__()
        stages = _stages(config.image_size)
        layers: list[nn.Module] = []
        channels, width = config.channels, config.width
        for _ in range(stages):
            layers += [nn.Conv2d(channels, width, 4, 2, 1), nn.LeakyReLU(0.2, True)]
            channels, width = width, width * 2
        self.features = nn.Sequential(*layers, nn.Flatten())
        self.score = nn.Linear(channels * 16, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.score(self.features(images)).squeeze(-1)


class WGAN(nn.Module):
    """A generator and its critic as one module. `forward(mode="critic", real=...)` scores a real batch and as many
    fresh fakes (the generator under no_grad); `forward(mode="generator", batch_size=B)` scores B fresh fakes with
    the generator's graph kept."""

    def __init__(self, config: DCGANConfig, mean: list[float], std: list[float]):
        super().__init__()
        self.config = config
        self.generator = Generator(config, mean, std)
        self.critic = Critic(config)

    def noise(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        device = self.critic.score.weight.device
        return torch.randn(batch_size, self.config.noise_dim, device=device, generator=generator)

    def forward(self, mode: Literal["critic", "generator"], real: torch.Tensor | None = None,
                batch_size: int | None = None) -> dict[str, torch.Tensor]:
        if mode == "critic":
            with torch.no_grad():
                fake = self.generator(self.noise(real.shape[0]))
            return {"real_scores": self.critic(real), "fake_scores": self.critic(fake), "fake": fake}
        fake = self.generator(self.noise(batch_size))
        return {"fake_scores": self.critic(fake), "fake": fake}
