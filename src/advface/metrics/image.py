"""Image-quality metrics between originals and reconstructions: SSIM, PSNR, MSE.

Images are float tensors (N, 3, H, W) in [0, 1]. All functions return per-image values;
:func:`summarize` gives the mean and a 95% confidence interval.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torchmetrics.functional.image import structural_similarity_index_measure

SSIM_KERNEL = 11
SSIM_SIGMA = 1.5
DATA_RANGE = 1.0


def _check_pair(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(
            "expected two (N,C,H,W) tensors of equal shape, "
            f"got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    if x.shape[0] == 0:
        raise ValueError("no images")
    for name, t in (("x", x), ("y", y)):
        if not t.is_floating_point():
            # A uint8 image against a [0,1] float one would score as noise, silently.
            raise ValueError(f"{name} must be a float image in [0, 1], got dtype {t.dtype}")
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} holds NaN/Inf values")


def ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM (N,): Gaussian window 11, sigma 1.5, data range 1, K1=0.01, K2=0.03.

    Computed per channel and averaged over channels and valid pixels (border of 5 pixels
    dropped), which matches ``skimage.metrics.structural_similarity(..., gaussian_weights=True,
    sigma=1.5, use_sample_covariance=False, data_range=1, channel_axis=...)``.
    """
    _check_pair(x, y)
    pad = (SSIM_KERNEL - 1) // 2
    if min(x.shape[-2:]) <= 2 * pad:
        raise ValueError(f"images must be larger than {2 * pad}x{2 * pad} for SSIM")
    # float32: float64 convolutions have no fast CPU kernel and made SSIM the bottleneck of
    # the benchmarks (about 1 s per image); float32 stays within 1e-4 of scikit-image.
    _, full = structural_similarity_index_measure(
        x.detach().float(),
        y.detach().float(),
        gaussian_kernel=True,
        sigma=SSIM_SIGMA,
        kernel_size=SSIM_KERNEL,
        data_range=DATA_RANGE,
        reduction="none",
        return_full_image=True,
    )
    # torchmetrics averages the whole reflect-padded map; the reference definition (Wang et al.,
    # scikit-image) averages only pixels whose window lies inside the image, so crop the border.
    return full[..., pad:-pad, pad:-pad].flatten(1).mean(1).float()


def mse(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image mean squared error (N,) over all channels and pixels."""
    _check_pair(x, y)
    return ((x.detach().double() - y.detach().double()) ** 2).flatten(1).mean(1).float()


def psnr(x: torch.Tensor, y: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Per-image PSNR in dB (N,) with data range 1; identical images give 10*log10(1/eps)."""
    m = mse(x, y).double().clamp_min(eps)
    return (10 * torch.log10(DATA_RANGE**2 / m)).float()


def image_metrics(x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """All three per-image metrics: ``{"ssim", "psnr", "mse"}`` each (N,)."""
    return {"ssim": ssim(x, y), "psnr": psnr(x, y), "mse": mse(x, y)}


@dataclass(frozen=True)
class Summary:
    """Mean of per-image values with a two-sided 95% confidence interval (Student t)."""

    mean: float
    ci_low: float
    ci_high: float
    std: float
    n: int

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def summarize(values: np.ndarray | torch.Tensor | list[float], level: float = 0.95) -> Summary:
    """Mean and t-interval of the mean; a single value gets a degenerate interval."""
    from scipy.stats import t

    v = np.asarray(values.cpu() if isinstance(values, torch.Tensor) else values, dtype=np.float64)
    if v.ndim != 1 or v.size == 0:
        raise ValueError(f"need a non-empty 1-D array of values, got shape {v.shape}")
    if not np.isfinite(v).all():
        raise ValueError(f"values must be finite, got {int((~np.isfinite(v)).sum())} NaN/Inf")
    _check_level(level)
    n, mean = v.size, float(v.mean())
    if n == 1:
        return Summary(mean, mean, mean, 0.0, 1)
    std = float(v.std(ddof=1))
    half = float(t.ppf(0.5 + level / 2, n - 1)) * std / math.sqrt(n)
    return Summary(mean, mean - half, mean + half, std, n)


def _check_level(level: float) -> None:
    if isinstance(level, bool) or not isinstance(level, int | float) or not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}")


def proportion_ci(successes: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a success rate (well-behaved near 0 and 1, unlike Wald)."""
    from scipy.stats import norm

    for name, value in (("successes", successes), ("n", n)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise ValueError(f"{name} must be an integer, got {value!r}")
    if n <= 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n and n > 0, got {successes}/{n}")
    _check_level(level)
    z = float(norm.ppf(0.5 + level / 2))
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # The Wilson bounds at 0/n and n/n are exactly 0 and 1; float rounding would miss them.
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return low, high
