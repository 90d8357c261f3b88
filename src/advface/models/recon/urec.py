"""URec: a U-Net decoder (encoder-decoder with skip connections at feature resolution)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from advface.checks import check_int

from ._blocks import FEATURE_CHANNELS, ImageHead, check_input, conv_bn_relu


class URec(nn.Module):
    """Input (N, 64, 77, 77) -> output (N, 3, 160, 160) in [0, 1].

    A U-Net on the 77x77 feature map: ``levels`` stride-2 downsamplings (77 -> 39 -> 20 ...),
    channels doubling from ``width``; bilinear upsampling back to each skip's exact size
    (odd sizes do not halve evenly), concatenation, two conv-BN-ReLU; then the shared
    upsampling head 77 -> 79 -> 160 and a sigmoid.

    Defaults (CPU profile): ``width=16, levels=2`` (0.50 GFLOPs per image forward); GPU
    profile ``width=64, levels=3`` (9.1 GFLOPs).
    """

    def __init__(self, width: int = 16, levels: int = 2) -> None:
        super().__init__()
        self.width = check_int("width", width, low=2)
        self.levels = check_int("levels", levels, low=1)
        chans = [width * 2**i for i in range(levels + 1)]
        self.inc = nn.Sequential(conv_bn_relu(FEATURE_CHANNELS, width), conv_bn_relu(width, width))
        self.down = nn.ModuleList(
            nn.Sequential(
                conv_bn_relu(chans[i], chans[i + 1], stride=2),
                conv_bn_relu(chans[i + 1], chans[i + 1]),
            )
            for i in range(levels)
        )
        self.up = nn.ModuleList(
            nn.Sequential(
                conv_bn_relu(chans[i + 1] + chans[i], chans[i]), conv_bn_relu(chans[i], chans[i])
            )
            for i in reversed(range(levels))
        )
        self.head = ImageHead(width, width, max(width // 2, 8))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        check_input(z)
        skips = [self.inc(z)]
        for down in self.down:
            skips.append(down(skips[-1]))
        x = skips.pop()
        for up in self.up:
            skip = skips.pop()
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = up(torch.cat([x, skip], dim=1))
        return self.head(x)
