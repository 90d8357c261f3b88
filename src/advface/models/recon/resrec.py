"""ResRec: a ResNet-style decoder (residual blocks at feature resolution, then upsampling)."""

from __future__ import annotations

import torch
from torch import nn

from advface.checks import check_int

from ._blocks import FEATURE_CHANNELS, ImageHead, check_input, conv_bn_relu


class ResidualBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity shortcut (He et al. basic block)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            conv_bn_relu(channels, channels),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
        )
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x + self.body(x))


class ResRec(nn.Module):
    """Input (N, 64, 77, 77) -> output (N, 3, 160, 160) in [0, 1].

    stem 3x3 conv (64 -> width) -> ``blocks`` residual blocks at 77x77 -> upsampling head
    (77 -> 79 -> 160, width -> width/2) -> 3x3 conv to RGB -> sigmoid.

    Defaults are the CPU profile (``width=16, blocks=2``: 0.27 GFLOPs per image forward, about
    0.04-0.1 s per image per training step on one CPU core); the GPU profile is ``width=64,
    blocks=8`` (8.1 GFLOPs). Most compute sits at 77x77, so cost grows as ``blocks * width**2``.
    """

    def __init__(self, width: int = 16, blocks: int = 2) -> None:
        super().__init__()
        self.width = check_int("width", width, low=2)
        self.blocks = check_int("blocks", blocks, low=0)
        self.stem = conv_bn_relu(FEATURE_CHANNELS, width)
        self.body = nn.Sequential(*[ResidualBlock(width) for _ in range(blocks)])
        self.head = ImageHead(width, width, max(width // 2, 8))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        check_input(z)
        return self.head(self.body(self.stem(z)))
