"""TransRec: a layer-by-layer mirror of the client extractor E with transposed convolutions."""

from __future__ import annotations

import torch
from torch import nn

from advface.checks import check_int

from ._blocks import FEATURE_CHANNELS, ImageHead, check_input, conv_bn_relu


class TransRec(nn.Module):
    """E = conv 3x3/2 (3->32), conv 3x3 (32->32), conv 3x3 pad 1 (32->64); TransRec inverts it.

    Input (N, 64, 77, 77) -> output (N, 3, 160, 160) in [0, 1].

    * ``width`` (default 32, E's own width): channels of the mirrored layers.
    * ``depth`` (default 0): extra 3x3 conv-BN-ReLU layers at 77x77 before the mirror, for a
      deeper variant; depth 0 is the exact mirror (3 transposed layers + 1 RGB projection).

    Defaults (CPU profile): 0.49 GFLOPs per image forward; GPU profile ``width=64, depth=2``
    (2.3 GFLOPs).
    """

    def __init__(self, width: int = 32, depth: int = 0) -> None:
        super().__init__()
        self.width = check_int("width", width, low=1)
        self.depth = check_int("depth", depth, low=0)
        layers: list[nn.Module] = [
            # Mirror of conv2d_2b (3x3, pad 1, 32 -> 64): keeps 77x77.
            nn.ConvTranspose2d(FEATURE_CHANNELS, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        ]
        layers += [conv_bn_relu(width, width) for _ in range(depth)]
        self.body = nn.Sequential(*layers)
        # Mirrors of conv2d_2a (77 -> 79) and conv2d_1a (79 -> 160).
        self.head = ImageHead(width, width, width)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        check_input(z)
        return self.head(self.body(z))
