"""One evaluation of reconstructions, shared by ``advface attack``, ``advface reproduce`` and
the robustness bench: per-image SSIM / PSNR / MSE and the replayed embedding
(:func:`measure_batch`), then means with 95% intervals and SRRA at the system's thresholds
(:func:`summarize_recon`). Two callers given the same reconstructions get the same numbers."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

#: Per-image image-quality metrics, in report order.
IMAGE_METRICS: tuple[str, ...] = ("ssim", "psnr", "mse")
#: Threshold names of :func:`summarize_recon` -> the SRRA key reported for each.
SRRA_KEYS: dict[str, str] = {"operating": "srra", "far_1e-3": "srra_far_1e-3"}


@torch.no_grad()
def clean_embeddings(
    facenet: nn.Module, images: np.ndarray, device: str | torch.device = "cpu"
) -> np.ndarray:
    """Unit-norm FaceNet embeddings of uint8 faces (N,H,W,3): the replay's reference."""
    from advface.models.facenet import preprocess

    emb = facenet(preprocess(images).to(device)).float()
    return nn.functional.normalize(emb, dim=1).cpu().numpy()


@torch.no_grad()
def measure_batch(
    rec: torch.Tensor, target: torch.Tensor, facenet: nn.Module | None
) -> dict[str, np.ndarray]:
    """Per-image metrics of reconstructions ``rec`` against originals ``target`` (both
    (N,3,H,W), [0,1]; ``rec`` is clamped to [0,1] first, as any image would be), and, with a
    ``facenet``, the unit-norm embedding of each reconstruction fed as a [0,1] image (``emb``,
    the replay attack)."""
    from advface.metrics.image import image_metrics
    from advface.models.facenet import unit_to_facenet

    if rec.shape != target.shape:
        raise ValueError(f"reconstructions {tuple(rec.shape)} and originals differ in shape")
    rec = rec.float().clamp(0, 1)
    target = target.float().to(rec.device)
    out = {k: v.cpu().numpy() for k, v in image_metrics(rec, target).items()}
    if facenet is None:
        return out
    emb = facenet(unit_to_facenet(rec)).float()
    out["emb"] = nn.functional.normalize(emb, dim=1).cpu().numpy()
    return out


def summarize_recon(
    per_image: Mapping[str, np.ndarray],
    clean_emb: np.ndarray | None = None,
    thresholds: Mapping[str, float] | None = None,
) -> dict:
    """Mean and 95% t-interval (``<k>_ci95``) of each image metric; with the replayed
    embeddings (``per_image["emb"]``), the clean ones and ``thresholds`` (``operating`` and/or
    ``far_1e-3``), SRRA at each with its Wilson interval, the mean replay cosine and n."""
    from advface.attacks.replay import replay_success
    from advface.metrics.image import summarize

    out: dict = {}
    for k in IMAGE_METRICS:
        s = summarize(per_image[k])
        out[k], out[f"{k}_ci95"] = s.mean, [s.ci_low, s.ci_high]
    if clean_emb is None or not thresholds or "emb" not in per_image:
        return out
    unknown = set(thresholds) - set(SRRA_KEYS)
    if unknown:
        raise ValueError(f"unknown thresholds {sorted(unknown)}; use {sorted(SRRA_KEYS)}")
    emb = np.asarray(per_image["emb"])
    replay = replay_success(emb, np.asarray(clean_emb)[: len(emb)], dict(thresholds))
    for name, key in SRRA_KEYS.items():
        if name in replay.rates:
            out[key], out[f"{key}_ci95"] = replay.rates[name], list(replay.ci[name])
    out["replay_cosine"] = float(np.mean(replay.cosine))
    out["n_images"] = replay.n
    return out
