"""Optimisation-based inversion: recover a face from a stored feature with no training.

Given stored features z' (N,64,77,77), find images x (N,3,160,160) in [0,1] minimising

    feature_weight * ||E(x) - z'||^2 / numel  +  id_weight * (1 - cos(Psi(E(x)), e))
        +  tv_weight * TV(x)        with e = Psi(z') (or a given embedding)

by Adam on an unconstrained parameter (x = sigmoid(p)), started from ``init`` (default: a grey
image; the attacker's mean face is a stronger start). E is three convolutions, so the feature
term nearly determines x on unprotected features; the identity term uses only what Psi reads
and is what remains against a protection that keeps Psi's embedding. TV is the anisotropic
total variation (mean absolute difference of neighbouring pixels), the image prior.
Defaults: 200 steps, lr 0.05, tv_weight 0.05, id_weight 0.1, feature_weight 1. With
``feature_weight=0`` the attack sees only the embedding: :meth:`FeatureInversion.from_embedding`
is then the optimisation-based replay that any stored embedding allows (the embedding floor's
replay). Cost: ``steps`` forward+backward passes of E (about 1 GFLOP per image and step), plus
Psi's when ``id_weight > 0``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from advface.checks import check_batch
from advface.models.facenet import unit_to_facenet


def total_variation(x: Tensor) -> Tensor:
    """Mean absolute difference of vertically and horizontally adjacent pixels, per image (N,)."""
    dv = (x[..., 1:, :] - x[..., :-1, :]).abs().flatten(1).mean(1)
    dh = (x[..., :, 1:] - x[..., :, :-1]).abs().flatten(1).mean(1)
    return dv + dh


@dataclass(frozen=True)
class InversionSettings:
    """Hyper-parameters of :class:`FeatureInversion` (validated on construction)."""

    steps: int = 200
    lr: float = 0.05
    tv_weight: float = 0.05
    id_weight: float = 0.1
    feature_weight: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {self.steps!r}")
        for name in ("lr", "tv_weight", "id_weight", "feature_weight"):
            v = getattr(self, name)
            if not isinstance(v, int | float) or not v >= 0 or v != v or v == float("inf"):
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        if self.lr == 0:
            raise ValueError("lr must be > 0")
        if self.feature_weight == 0 and self.id_weight == 0:
            raise ValueError("feature_weight and id_weight cannot both be 0 (nothing to match)")


class FeatureInversion(nn.Module):
    """Callable attacker: ``inv(z_stored) -> x`` in [0,1], same interface as a trained decoder.

    Args:
        extractor: E, FaceNet input (N,3,160,160) -> (N,64,77,77); frozen here.
        head: Psi, (N,64,77,77) -> (N,512); only used when ``settings.id_weight > 0``.
        settings: :class:`InversionSettings`.
        init: optional start image (3,160,160) in [0,1], e.g. the attacker's mean face.
    """

    def __init__(
        self,
        extractor: nn.Module,
        head: nn.Module | None = None,
        settings: InversionSettings | None = None,
        init: Tensor | None = None,
    ) -> None:
        super().__init__()
        self.settings = settings or InversionSettings()
        if self.settings.id_weight > 0 and head is None:
            raise ValueError("id_weight > 0 needs the head Psi")
        self.extractor = extractor.eval()
        self.head = head.eval() if head is not None else None
        for p in self.parameters():
            p.requires_grad_(False)
        if init is not None and (init.shape != (3, 160, 160) or not init.is_floating_point()):
            raise ValueError(f"init must be a float image (3,160,160), got {tuple(init.shape)}")
        self.register_buffer("init", init.clamp(0.01, 0.99) if init is not None else None)

    def forward(self, z: Tensor) -> Tensor:
        check_batch("features", z, dims=4)
        target_e = None
        if self.settings.id_weight > 0:
            with torch.no_grad():
                target_e = F.normalize(self.head(z.detach().float()), dim=1)
        return self._invert(z.detach().float(), target_e, len(z), z.device)

    def from_embedding(self, e: Tensor) -> Tensor:
        """Images whose embedding matches ``e`` (N,512): the replay any stored embedding allows
        (needs ``feature_weight=0``)."""
        if self.settings.feature_weight > 0:
            raise ValueError("from_embedding needs feature_weight=0 (no feature map to match)")
        check_batch("embeddings", e, dims=2)
        target = F.normalize(e.detach().float(), dim=1)
        return self._invert(None, target, len(e), e.device)

    def _invert(self, z: Tensor | None, target_e: Tensor | None, n: int, device) -> Tensor:
        s = self.settings
        start = self.init if self.init is not None else torch.full((3, 160, 160), 0.5)
        start = start.to(device, torch.float32).expand(n, -1, -1, -1)
        param = torch.logit(start.clamp(0.01, 0.99)).clone()
        with torch.inference_mode(False), torch.enable_grad():
            param.requires_grad_(True)
            opt = torch.optim.Adam([param], lr=s.lr)
            for _ in range(s.steps):
                x = torch.sigmoid(param)
                zx = self.extractor(unit_to_facenet(x))
                loss = torch.zeros(n, device=device)
                if z is not None and s.feature_weight > 0:
                    loss = loss + s.feature_weight * (zx - z).pow(2).flatten(1).mean(1)
                if target_e is not None:
                    loss = loss + s.id_weight * (1 - F.cosine_similarity(self.head(zx), target_e))
                if s.tv_weight > 0:
                    loss = loss + s.tv_weight * total_variation(x)
                opt.zero_grad(set_to_none=True)
                loss.sum().backward()
                opt.step()
        return torch.sigmoid(param).detach()


class EmbeddingInversion(nn.Module):
    """The embedding floor's replay: optimise an image to Psi's embedding of the stored feature,
    seeing nothing else (``inv`` must have ``feature_weight=0``)."""

    def __init__(self, inv: FeatureInversion) -> None:
        super().__init__()
        if inv.settings.feature_weight != 0 or inv.head is None:
            raise ValueError("EmbeddingInversion needs a FeatureInversion with feature_weight=0")
        self.inv = inv

    def forward(self, z: Tensor) -> Tensor:
        with torch.no_grad():
            e = self.inv.head(z.detach().float())
        return self.inv.from_embedding(e)


class MeanFace(nn.Module):
    """The mean-face floor: every "reconstruction" is the attacker's mean training face (no
    information about the input). ``MeanFace(images)`` with uint8 (N,160,160,3)."""

    def __init__(self, mean_image: Tensor) -> None:
        super().__init__()
        if mean_image.shape != (3, 160, 160):
            raise ValueError(f"mean image must be (3,160,160), got {tuple(mean_image.shape)}")
        self.register_buffer("mean_image", mean_image.float().clamp(0, 1))

    @classmethod
    def from_images(cls, images) -> MeanFace:
        import numpy as np

        arr = np.asarray(images)
        if arr.ndim != 4 or arr.shape[1:] != (160, 160, 3) or arr.dtype != np.uint8 or not len(arr):
            raise ValueError(f"expected uint8 faces (N,160,160,3), got {arr.dtype} {arr.shape}")
        mean = torch.from_numpy(arr.astype(np.float64).mean(0) / 255.0).permute(2, 0, 1)
        return cls(mean.float())

    def forward(self, z: Tensor) -> Tensor:
        return self.mean_image.to(z.device).expand(len(z), -1, -1, -1).clone()


class EmbeddingAttack(nn.Module):
    """An embedding decoder used against stored features: x = D_att(Psi(z')). With the decoder
    trained on clean embeddings this is the embedding floor when z' = z, and a replay of what
    the server's own Psi reads from any protected z'."""

    def __init__(self, decoder: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.decoder = decoder.eval()
        self.head = head.eval()

    @torch.no_grad()
    def forward(self, z: Tensor) -> Tensor:
        return self.decoder(self.head(z))
