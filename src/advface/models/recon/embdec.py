"""EmbDec: an embedding-to-image decoder, (N, 512) -> (N, 3, 160, 160) in [0, 1].

Two roles: the *embedding floor* attacker (the best reconstruction from what any face system
stores, the embedding e = Psi(z)), and the server's generator D of the ``embedding-shadow``
protection (a face-like image made from e alone).

Linear layer to a (8w, 5, 5) map, then five 2x nearest-neighbour upsamplings, each followed by
a 3x3 conv-BN-ReLU: 5 -> 10 -> 20 -> 40 -> 80 -> 160 with 8w, 4w, 2w, w, w channels, and a
3x3 conv to RGB with a sigmoid. ``width=16`` (CPU profile) costs about 0.33 GFLOPs per image
forward, ``width=64`` (GPU profile) about 5.3.
"""

from __future__ import annotations

import torch
from torch import nn

from advface.checks import check_int

from ._blocks import conv_bn_relu

EMBEDDING_DIM = 512


class EmbDec(nn.Module):
    """Input (N, ``dim``) embeddings (any norm; normalised inside) -> (N, 3, 160, 160)."""

    #: Per-sample input shape (what :func:`estimate_flops` feeds it).
    input_shape: tuple[int, ...]

    def __init__(self, width: int = 16, dim: int = EMBEDDING_DIM) -> None:
        super().__init__()
        self.width = check_int("width", width, low=2)
        self.dim = check_int("dim", dim, low=1)
        self.input_shape = (dim,)
        chans = [8 * width, 8 * width, 4 * width, 2 * width, width, width]
        self.fc = nn.Sequential(
            nn.Linear(dim, chans[0] * 25, bias=False),
            nn.BatchNorm1d(chans[0] * 25),
            nn.ReLU(inplace=True),
        )
        ups = []
        for cin, cout in zip(chans[:-1], chans[1:], strict=True):
            ups += [nn.Upsample(scale_factor=2, mode="nearest"), conv_bn_relu(cin, cout)]
        self.up = nn.Sequential(*ups)
        self.to_rgb = nn.Conv2d(chans[-1], 3, 3, padding=1)
        self._c0 = chans[0]

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        if e.ndim != 2 or e.shape[1] != self.dim:
            raise ValueError(f"expected embeddings (N, {self.dim}), got {tuple(e.shape)}")
        e = nn.functional.normalize(e, dim=1)
        h = self.fc(e).view(len(e), self._c0, 5, 5)
        return torch.sigmoid(self.to_rgb(self.up(h)))
