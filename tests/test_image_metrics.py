"""SSIM / PSNR / MSE per image, cross-checked against scikit-image; confidence intervals."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from advface.metrics.image import image_metrics, proportion_ci, psnr, ssim, summarize


def _pair(n: int = 3, size: int = 48, noise: float = 0.15):
    g = torch.Generator().manual_seed(0)
    # Smooth-ish images (blurred noise) so SSIM is far from 0 and 1.
    x = torch.nn.functional.avg_pool2d(torch.rand(n, 3, size + 4, size + 4, generator=g), 5, 1)
    y = (x + noise * torch.randn(x.shape, generator=g)).clamp(0, 1)
    return x, y


def test_ssim_matches_skimage() -> None:
    x, y = _pair()
    ours = ssim(x, y)
    for i in range(len(x)):
        ref = structural_similarity(
            x[i].numpy().astype(np.float64),
            y[i].numpy().astype(np.float64),
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
            data_range=1,
            channel_axis=0,
        )
        assert abs(float(ours[i]) - ref) < 1e-4


def test_ssim_identity_and_order() -> None:
    x, y = _pair()
    assert torch.allclose(ssim(x, x), torch.ones(len(x)), atol=1e-6)
    _, y_more = _pair(noise=0.4)
    assert bool((ssim(x, y_more) < ssim(x, y)).all())


def test_psnr_mse_match_skimage() -> None:
    x, y = _pair()
    m = image_metrics(x, y)
    for i in range(len(x)):
        ref = peak_signal_noise_ratio(x[i].numpy(), y[i].numpy(), data_range=1)
        assert abs(float(m["psnr"][i]) - ref) < 1e-3
        assert abs(float(m["mse"][i]) - float(((x[i] - y[i]) ** 2).mean())) < 1e-7
    assert float(psnr(x, x)[0]) > 100


def test_shape_errors() -> None:
    with pytest.raises(ValueError):
        ssim(torch.rand(1, 3, 20, 20), torch.rand(1, 3, 20, 21))
    with pytest.raises(ValueError):
        ssim(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8))


@pytest.mark.parametrize("metric", [ssim, psnr, image_metrics])
def test_uint8_or_non_finite_images_are_refused(metric) -> None:
    x = torch.rand(2, 3, 20, 20)
    as_uint8 = (x * 255).round().to(torch.uint8)
    with pytest.raises(ValueError, match="float image"):
        metric(as_uint8, x)
    poisoned = x.clone()
    poisoned[1, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        metric(x, poisoned)


def test_summary_interval() -> None:
    rng = np.random.default_rng(0)
    v = rng.normal(0.5, 0.1, 400)
    s = summarize(v)
    assert s.ci_low < s.mean < s.ci_high and s.n == 400
    assert math.isclose(s.ci_high - s.mean, 1.966 * v.std(ddof=1) / 20, rel_tol=1e-2)
    assert summarize([0.3]).ci_low == 0.3
    with pytest.raises(ValueError):
        summarize([])
    with pytest.raises(ValueError, match="finite"):
        summarize([0.5, float("nan")])
    with pytest.raises(ValueError, match="level"):
        summarize([0.5, 0.6], level=1.5)


def test_proportion_ci() -> None:
    lo, hi = proportion_ci(97, 100)
    assert lo < 0.97 < hi <= 1.0
    assert proportion_ci(0, 10)[0] == 0.0 and proportion_ci(10, 10)[1] == 1.0
    with pytest.raises(ValueError):
        proportion_ci(3, 2)
    assert proportion_ci(np.int64(97), 100) == (lo, hi)
    for bad in ({"level": 1.5}, {"level": 0.0}, {"successes": 2.5}, {"n": True}):
        args = {"successes": 3, "n": 10, **bad}
        with pytest.raises(ValueError, match=next(iter(bad))):
            proportion_ci(**args)
