"""Building blocks shared by the reconstruction networks.

Every network maps E's feature map (N, 64, 77, 77) to an image (N, 3, 160, 160) in [0, 1].
The spatial path 77 -> 79 -> 160 inverts E's first two convolutions (3x3 valid: 79 -> 77;
3x3 stride 2 valid: 160 -> 79), so all decoders end with the same upsampling head.
"""

from __future__ import annotations

import torch
from torch import nn

FEATURE_CHANNELS = 64
FEATURE_SIZE = 77
IMAGE_SIZE = 160


def conv_bn_relu(
    cin: int, cout: int, k: int = 3, stride: int = 1, padding: int = 1
) -> nn.Sequential:
    """Conv -> BatchNorm -> ReLU (conv bias is redundant before BN)."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride=stride, padding=padding, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


def deconv_bn_relu(cin: int, cout: int, stride: int = 1, output_padding: int = 0) -> nn.Sequential:
    """3x3 transposed conv without padding (grows the map by 2 at stride 1) -> BN -> ReLU."""
    return nn.Sequential(
        nn.ConvTranspose2d(cin, cout, 3, stride=stride, output_padding=output_padding, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class ImageHead(nn.Module):
    """(N, c, 77, 77) -> (N, 3, 160, 160) in [0, 1]: mirrors E's conv2d_2a and conv2d_1a.

    77 -> 79 (3x3 transposed, stride 1), 79 -> 160 (3x3 transposed, stride 2, output_padding 1),
    then a 3x3 conv to RGB and a sigmoid.
    """

    def __init__(self, cin: int, mid: int, out: int) -> None:
        super().__init__()
        self.up1 = deconv_bn_relu(cin, mid)
        self.up2 = deconv_bn_relu(mid, out, stride=2, output_padding=1)
        self.to_rgb = nn.Conv2d(out, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.to_rgb(self.up2(self.up1(x))))


def check_input(z: torch.Tensor) -> None:
    if z.ndim != 4 or z.shape[1] != FEATURE_CHANNELS:
        raise ValueError(
            f"expected feature maps (N, {FEATURE_CHANNELS}, H, W), got {tuple(z.shape)}"
        )
