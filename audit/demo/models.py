"""Small classifiers the demo, tests and benchmarks train: a ResNet-style CNN and a plain MLP
for 8x8 digits.

GroupNorm instead of BatchNorm: per-example gradients and short fine-tuning runs on a handful
of examples must not depend on (or update) batch statistics.
"""

from __future__ import annotations

import torch
from torch import nn


class ResidualBlock(nn.Module):
    """conv-norm-relu-conv-norm plus identity, then relu. Keeps [B, C, H, W]."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm1 = nn.GroupNorm(4, channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(4, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.norm1(self.conv1(x)))
        return torch.relu(x + self.norm2(self.conv2(y)))


class SmallResNet(nn.Module):
    """ResNet-style CNN. Input [B, 1, H, W] raw pixels in [0, pixel_max]; output logits [B, classes]."""

    def __init__(self, num_classes: int = 10, channels: int = 16, blocks: int = 2, pixel_max: float = 16.0):
        super().__init__()
        self.pixel_max = pixel_max
        self.stem = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1, bias=False), nn.GroupNorm(4, channels), nn.ReLU()
        )
        self.blocks = nn.Sequential(*[ResidualBlock(channels) for _ in range(blocks)])
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(self.stem(x / self.pixel_max))
        return self.head(h.mean(dim=(2, 3)))  # global average pool -> [B, C]


class DigitsMLP(nn.Module):
    """Plain MLP 64-32-10 (tanh), 2,410 parameters. Input [B, 1, 8, 8] (or [B, 64]) raw pixels in
    [0, 16]; output logits [B, 10]. The tabular-style model of the influence tests and benchmark."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x / 16.0)
