"""The closed-form ridge embedding decoder (advface.attacks.ridge)."""

import numpy as np
import pytest
import torch

from advface.attacks.ridge import RidgeDecoder, _folds, _solve, fit_ridge_decoder


def _data(n=120, d=16, hw=6, noise=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(n, d, generator=g)
    w = torch.randn(d, 3 * hw * hw, generator=g) * 0.03
    y = 0.5 + e @ w + noise * torch.randn(n, 3 * hw * hw, generator=g)
    return e, y.clamp(0, 1).view(n, 3, hw, hw)


def _direct_cv(e, y, groups, lam, k):
    """Held-out MSE of ``lam`` by fitting each fold and predicting (what the fast path expands)."""
    e, y = e.double(), y.flatten(1).float()
    sse = 0.0
    for val in _folds(np.asarray(groups), k, 0):
        train = np.setdiff1d(np.arange(len(e)), val)
        sol = _solve(e[train], y[train])
        w = sol.v.float() @ (sol.shrink(lam).float()[:, None] * sol.uty)
        pred = (e[val] - sol.e_mean).float() @ w + sol.y_mean
        sse += float(((pred - y[val]) ** 2).sum())
    return sse / y.numel()


def test_cross_validation_matches_fitting_each_fold():
    e, y = _data()
    fit = fit_ridge_decoder(e, y, lambdas=[1e-3, 0.1, 10.0], folds=4)
    for lam, mse in fit.cv_mse.items():
        assert mse == pytest.approx(_direct_cv(e, y, np.arange(len(e)), lam, 4), rel=1e-5)
    assert fit.lam == min(fit.cv_mse, key=fit.cv_mse.get) and fit.n == len(e)


def test_recovers_a_linear_map_and_tends_to_the_mean_image():
    e, y = _data(n=400, noise=0.0)
    fit = fit_ridge_decoder(e, y)
    err = float((fit.decoder(e) - y).abs().mean())
    assert err < 0.01  # noiseless and linear: nearly exact
    assert fit.lam < 1.0  # held-out error prefers little shrinkage here
    # Strong shrinkage gives the training mean image whatever the embedding.
    heavy = fit_ridge_decoder(e, y, lambdas=[1e8])
    out = heavy.decoder(torch.randn(3, e.shape[1]))
    assert torch.allclose(out, y.mean(0).expand(3, -1, -1, -1), atol=1e-4)


def test_pure_noise_targets_pick_strong_shrinkage():
    e, _ = _data()
    y = torch.rand(len(e), 3, 6, 6, generator=torch.Generator().manual_seed(1))
    fit = fit_ridge_decoder(e, y)
    assert fit.lam >= 10.0  # no signal: the fit stays near the mean image


def test_groups_keep_an_image_and_its_mirror_in_one_fold():
    groups = np.concatenate([np.arange(50)] * 2)
    for val in _folds(groups, 5, 0):
        held = set(groups[val])
        rest = set(groups[np.setdiff1d(np.arange(100), val)])
        assert held and not held & rest
    # The scale of the embeddings does not change the choice (lam is relative).
    e, y = _data()
    a = fit_ridge_decoder(e, y, groups=np.arange(len(e)) // 2)
    b = fit_ridge_decoder(e * 100, y, groups=np.arange(len(e)) // 2)
    assert a.lam == b.lam
    assert torch.allclose(a.decoder(e[:4]), b.decoder(e[:4] * 100), atol=1e-4)


def test_output_shape_range_and_fewer_images_than_dimensions():
    e, y = _data(n=12, d=40)  # rank-deficient: 12 images, 40 dimensions
    fit = fit_ridge_decoder(e, y, folds=3)
    out = fit.decoder(e)
    assert out.shape == (12, 3, 6, 6) and float(out.min()) >= 0 and float(out.max()) <= 1
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"folds": 1}, "folds"),
        ({"folds": 500}, "groups"),
        ({"lambdas": []}, "empty"),
        ({"lambdas": [0.0]}, "> 0"),
        ({"lambdas": [float("nan")]}, "finite"),
        ({"groups": [0, 1]}, "one entry per row"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_settings_are_value_errors(kwargs, match):
    e, y = _data(n=20)
    with pytest.raises(ValueError, match=match):
        fit_ridge_decoder(e, y, **kwargs)


def test_bad_inputs_are_value_errors():
    e, y = _data(n=20)
    with pytest.raises(ValueError, match="20 embeddings but 19"):
        fit_ridge_decoder(e, y[:19])
    with pytest.raises(ValueError, match=r"\[0,1\]"):
        fit_ridge_decoder(e, y * 255)
    bad = e.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        fit_ridge_decoder(bad, y)
    with pytest.raises(ValueError, match="floating"):
        fit_ridge_decoder(e.long(), y)
    fit = fit_ridge_decoder(e, y)
    with pytest.raises(ValueError, match=r"\(N,16\)"):
        fit.decoder(torch.zeros(2, 8))
    with pytest.raises(ValueError, match="do not fit"):
        RidgeDecoder(torch.zeros(4, 10), torch.zeros(10), torch.zeros(4), (3, 2, 2))
