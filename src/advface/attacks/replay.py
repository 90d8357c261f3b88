"""Replay attack: reconstructions are presented to the full face recognition system.

SRRA (success rate of replay attacks): the fraction of faces whose reconstruction R(z) the
unprotected FaceNet accepts as the original, i.e. cos(emb(R(z)), emb(x)) >= threshold, where
the threshold is the system's operating threshold (10-fold-selected on the dataset's pairs)
or its FAR=1e-3 threshold. Reconstructions are in [0,1] and enter FaceNet as x*255 then
(x - 127.5)/128, without rounding to uint8.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from advface.checks import check_batch, check_int
from advface.metrics.image import proportion_ci
from advface.models.facenet import unit_to_facenet


@torch.no_grad()
def embed_unit_images(
    model: nn.Module, x: torch.Tensor, *, batch_size: int = 32, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """Embeddings (N,512), unit norm, of [0,1] images (N,3,160,160) through the full FaceNet."""
    check_batch("images", x, dims=4)
    if x.shape[1] != 3:
        raise ValueError(f"expected images (N,3,H,W), got {tuple(x.shape)}")
    check_int("batch_size", batch_size, low=1)
    model = model.to(device).eval()
    out = [
        model(unit_to_facenet(x[s : s + batch_size].to(device))).float().cpu()
        for s in range(0, len(x), batch_size)
    ]
    return torch.nn.functional.normalize(torch.cat(out), dim=1)


def pair_cosine(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> np.ndarray:
    """Row-wise cosine similarity of two (N,D) embedding arrays."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"expected two (N,D) arrays of equal shape, got {a.shape} and {b.shape}")
    na = np.linalg.norm(a, axis=1)
    nb = np.linalg.norm(b, axis=1)
    return (a * b).sum(1) / np.maximum(na * nb, 1e-12)


@dataclass(frozen=True)
class ReplayResult:
    """SRRA at each named threshold: rate, Wilson 95% CI, successes, n."""

    cosine: np.ndarray
    thresholds: dict[str, float]
    rates: dict[str, float]
    ci: dict[str, tuple[float, float]]
    successes: dict[str, int]

    @property
    def n(self) -> int:
        return int(self.cosine.size)


def replay_success(
    emb_recon: np.ndarray | torch.Tensor,
    emb_orig: np.ndarray | torch.Tensor,
    thresholds: dict[str, float],
) -> ReplayResult:
    """A replay succeeds when cos(emb(recon), emb(original)) >= threshold (the system's rule)."""
    if not thresholds:
        raise ValueError("need at least one threshold")
    cos = pair_cosine(emb_recon, emb_orig)
    if cos.size == 0:
        raise ValueError("no embeddings")
    rates, ci, succ = {}, {}, {}
    for name, t in thresholds.items():
        if not np.isfinite(t):
            raise ValueError(f"threshold {name} is not finite: {t}")
        k = int((cos >= t).sum())
        succ[name], rates[name] = k, k / cos.size
        ci[name] = proportion_ci(k, cos.size)
    return ReplayResult(cos, dict(thresholds), rates, ci, succ)
