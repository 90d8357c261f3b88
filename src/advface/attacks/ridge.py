"""Ridge-regression embedding decoder: the closed-form linear map from an embedding to a face.

    x = clamp(x_mean + (e - e_mean) W, 0, 1)      e (N,D) embeddings, x (N,3,160,160) in [0,1]

W minimises ||X_c - E_c W||^2 + lam ||W||^2 over the attacker's training pairs (centred). lam is
picked from a grid by K-fold cross-validation on those pairs, folds drawn by group so that an
image and its mirror image never sit on both sides, and is relative to the mean squared
singular value of E_c, so one grid serves any embedding scale. Defaults: lambdas 10^-6 ... 10^2
(17 values, half-decade steps), 5 folds. Cost: a thin SVD of (n,D) and a (D,n)x(n,3*160*160)
product per fold: seconds on a CPU for a few thousand images.

Why it is here: an embedding floor must not depend on how long a network was trained. A
narrow decoder trained for minutes can fall below the mean face (an output with no
information); the ridge decoder reduces to the mean face as lam grows and cross-validation only
moves away from it when held-out error falls, so what it reaches depends on its training
images, not on a training budget.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from advface.checks import check_batch, check_finite_number, check_int

#: Relative ridge strengths tried by default (times the mean squared singular value of E_c).
DEFAULT_LAMBDAS: tuple[float, ...] = tuple(float(10.0**k) for k in np.arange(-6.0, 2.01, 0.5))
#: Cross-validation folds by default.
DEFAULT_FOLDS = 5


class RidgeDecoder(nn.Module):
    """A fitted linear decoder: ``forward(e)`` maps embeddings (N,D) to images (N,3,H,W)."""

    def __init__(
        self, weight: Tensor, bias: Tensor, e_mean: Tensor, image_shape=(3, 160, 160)
    ) -> None:
        super().__init__()
        d, p = weight.shape
        if bias.shape != (p,) or e_mean.shape != (d,) or int(np.prod(image_shape)) != p:
            raise ValueError(
                f"weight {tuple(weight.shape)}, bias {tuple(bias.shape)}, e_mean "
                f"{tuple(e_mean.shape)} and image shape {tuple(image_shape)} do not fit together"
            )
        self.image_shape = tuple(image_shape)
        self.register_buffer("weight", weight.float())
        self.register_buffer("bias", bias.float())
        self.register_buffer("e_mean", e_mean.float())

    def forward(self, e: Tensor) -> Tensor:
        check_batch("embeddings", e, dims=2)
        if e.shape[1] != self.weight.shape[0]:
            raise ValueError(f"embeddings must be (N,{self.weight.shape[0]}), got {tuple(e.shape)}")
        x = (e.float() - self.e_mean) @ self.weight + self.bias
        return x.view(len(e), *self.image_shape).clamp(0, 1)


@dataclass(frozen=True)
class RidgeFit:
    """A fitted decoder, the relative lam chosen and each candidate's held-out MSE."""

    decoder: RidgeDecoder
    lam: float
    cv_mse: dict[float, float] = field(default_factory=dict)
    n: int = 0


@dataclass
class _Solved:
    """A centred ridge problem's thin SVD, E_c = U diag(s) V^T, and U^T Y_c."""

    e_mean: Tensor
    y_mean: Tensor
    v: Tensor  # (D, r)
    s: Tensor  # (r,)
    uty: Tensor  # (r, P)

    def shrink(self, lam: float) -> Tensor:
        """Per-component factors s / (s^2 + lam * mean(s^2)) for a relative ``lam``."""
        s2 = self.s**2
        return self.s / (s2 + lam * s2.mean())


def _solve(e: Tensor, y: Tensor) -> _Solved:
    e_mean, y_mean = e.mean(0), y.mean(0)
    u, s, vh = torch.linalg.svd(e - e_mean, full_matrices=False)
    keep = s > s[0] * 1e-10  # rank-deficient E (fewer images than dimensions)
    u, s, v = u[:, keep], s[keep], vh[keep].T
    return _Solved(e_mean, y_mean, v, s, u.T.to(y.dtype) @ (y - y_mean))


def _folds(groups: np.ndarray, k: int, seed: int) -> list[np.ndarray]:
    """Row indices of ``k`` validation folds, whole groups each, drawn with ``seed``."""
    uniq = np.unique(groups)
    if len(uniq) < k:
        raise ValueError(f"{k} folds need at least {k} groups, got {len(uniq)}")
    order = np.random.default_rng(seed).permutation(uniq)
    return [np.flatnonzero(np.isin(groups, part)) for part in np.array_split(order, k)]


def _cv_errors(
    e: Tensor, y: Tensor, groups: np.ndarray, lambdas: Sequence[float], k: int, seed: int
) -> dict[float, float]:
    """Mean held-out squared error per pixel of each lam. ||A - B C||^2 is expanded through
    A C^T and C C^T, so each lam costs (n_val, r) products instead of a full prediction."""
    sse = dict.fromkeys(lambdas, 0.0)
    for val in _folds(groups, k, seed):
        train = np.setdiff1d(np.arange(len(e)), val)
        sol = _solve(e[train], y[train])
        a = y[val] - sol.y_mean  # (n_val, P)
        b0 = (e[val] - sol.e_mean) @ sol.v  # (n_val, r), float64
        act = (a @ sol.uty.T).double()  # (n_val, r)
        cct = (sol.uty @ sol.uty.T).double()  # (r, r)
        a2 = float((a.double() ** 2).sum())
        for lam in lambdas:
            b = b0 * sol.shrink(lam)
            sse[lam] += a2 - 2 * float((b * act).sum()) + float(((b @ cct) * b).sum())
    return {lam: v / y.numel() for lam, v in sse.items()}


def fit_ridge_decoder(
    embeddings: Tensor,
    images: Tensor,
    *,
    groups: Sequence[int] | np.ndarray | None = None,
    lambdas: Sequence[float] = DEFAULT_LAMBDAS,
    folds: int = DEFAULT_FOLDS,
    seed: int = 0,
) -> RidgeFit:
    """Fit a :class:`RidgeDecoder` on ``embeddings`` (N,D) and ``images`` (N,3,H,W) in [0,1].

    ``groups`` (N,) keeps rows together in cross-validation (give an image and its mirror image
    one group; default: every row its own). lam is the grid value with the lowest held-out MSE;
    the decoder is then fit on all N rows. Runs on the tensors' device, in float64 for the SVD.
    """
    check_batch("embeddings", embeddings, dims=2)
    check_batch("images", images, dims=4)
    if len(images) != len(embeddings):
        raise ValueError(f"{len(embeddings)} embeddings but {len(images)} images")
    if float(images.min()) < 0 or float(images.max()) > 1:
        raise ValueError("images must be in [0,1]")
    folds = check_int("folds", folds, low=2)
    seed = check_int("seed", seed, low=0)
    if not len(lambdas):
        raise ValueError("lambdas must not be empty")
    lams = [check_finite_number("lambda", v, low=0.0) for v in lambdas]
    if min(lams) <= 0:
        raise ValueError("every lambda must be > 0")
    g = np.arange(len(embeddings)) if groups is None else np.asarray(groups)
    if g.shape != (len(embeddings),):
        raise ValueError(f"groups must have one entry per row ({len(embeddings)}), got {g.shape}")
    e = embeddings.double()
    y = images.flatten(1).float()
    cv = _cv_errors(e, y, g, lams, folds, seed)
    best = min(cv, key=cv.__getitem__)
    sol = _solve(e, y)
    weight = sol.v.float() @ (sol.shrink(best).float()[:, None] * sol.uty)
    dec = RidgeDecoder(weight, sol.y_mean, sol.e_mean.float(), tuple(images.shape[1:]))
    return RidgeFit(dec, best, cv, len(embeddings))
