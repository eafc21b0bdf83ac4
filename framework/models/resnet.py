"""A small ResNet for small images (He et al., https://arxiv.org/abs/1512.03385), CIFAR-style: 3×3 stem, no max-pool.

The last BatchNorm of every residual branch starts at zero (Goyal et al., https://arxiv.org/abs/1706.02677), so each
block starts as the identity and the network trains like a shallow one at first. Every residual branch ends in a
`DropPath` (the identity until the `stochastic_depth` technique sets its rate).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from framework.nn.drop_path import DropPath


@dataclass
class ResNetConfig:
    """ResNet: stage widths and blocks (channels and classes come from the data)."""

    in_channels: int = 1
    """Image channels (1 for grayscale digits, 3 for RGB; the image recipe sets it from the data)."""
    num_classes: int = 10
    """Output classes (the image recipe sets it from the data)."""
    widths: tuple[int, ...] = (16, 32, 64)
    """Channels of each stage; every stage after the first halves the resolution."""
    blocks_per_stage: int = 1
    zero_init_residual: bool = True
    """Start each residual branch's last BatchNorm at zero."""


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.branch = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != out_channels:  # project the identity to the new shape
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )
        self.drop_path = DropPath()  # p = 0: the identity; the stochastic_depth technique sets p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.drop_path(self.branch(x)) + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, config: ResNetConfig):
        super().__init__()
        self.config = config
        width = config.widths[0]
        self.stem = nn.Sequential(
            nn.Conv2d(config.in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)
        )
        blocks = []
        for stage, out_width in enumerate(config.widths):
            for index in range(config.blocks_per_stage):
                stride = 2 if stage > 0 and index == 0 else 1
                blocks.append(BasicBlock(width, out_width, stride))
                width = out_width
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, config.num_classes))
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        if config.zero_init_residual:
            for block in blocks:
                nn.init.zeros_(block.branch[-1].weight)

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, num_classes)
        return self.head(self.blocks(self.stem(images)))
