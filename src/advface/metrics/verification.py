"""Face verification metrics on scored pairs: 10-fold accuracy, TAR at FAR, ROC AUC.

Scores are similarities (higher means "same person"); a pair is accepted when
``score >= threshold``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy.stats import rankdata


@dataclass(frozen=True)
class VerificationResult:
    """Outcome of :func:`evaluate_pairs`; accuracies are fractions in [0, 1]."""

    accuracy: float
    accuracy_std: float
    fold_accuracies: tuple[float, ...]
    fold_thresholds: tuple[float, ...]
    threshold: float
    tar_at_far: float
    far_target: float
    far_threshold: float
    auc: float
    n_pairs: int

    def to_dict(self) -> dict:
        return asdict(self)


def _validate(scores: np.ndarray, issame: np.ndarray, folds: np.ndarray | None) -> None:
    if scores.ndim != 1 or issame.shape != scores.shape:
        raise ValueError(
            f"scores and issame must be 1-D of equal length, got {scores.shape} and {issame.shape}"
        )
    if scores.size == 0:
        raise ValueError("no pairs to evaluate")
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores contain NaN or Inf")
    if issame.all() or not issame.any():
        raise ValueError("need both genuine and impostor pairs")
    if folds is not None and folds.shape != scores.shape:
        raise ValueError(f"folds must match scores, got {folds.shape} vs {scores.shape}")


def best_threshold(scores: np.ndarray, issame: np.ndarray) -> float:
    """Threshold maximising accuracy of ``score >= t`` (midpoint between tied candidates)."""
    order = np.argsort(scores, kind="stable")
    s, y = scores[order], issame[order].astype(np.int64)
    # Thresholding at s[k] accepts s[k:]: correct = impostors below k + genuines from k on.
    imp_below = np.concatenate([[0], np.cumsum(1 - y)])
    gen_from = np.concatenate([np.cumsum(y[::-1])[::-1], [0]])
    correct = imp_below + gen_from
    # Only cut between distinct scores (k = 0 and k = n are the all/none cases).
    valid = np.ones(len(s) + 1, dtype=bool)
    valid[1:-1] = s[1:] > s[:-1]
    k = int(np.argmax(np.where(valid, correct, -1)))
    if k == 0:
        return float(s[0] - 1e-6)
    if k == len(s):
        return float(s[-1] + 1e-6)
    return float((s[k - 1] + s[k]) / 2)


def accuracy_at(scores: np.ndarray, issame: np.ndarray, threshold: float) -> float:
    return float(np.mean((scores >= threshold) == issame))


def threshold_at_far(scores: np.ndarray, issame: np.ndarray, far: float) -> float:
    """Smallest threshold whose false accept rate on the impostor pairs is <= ``far``."""
    if not 0 < far < 1:
        raise ValueError(f"far must be in (0, 1), got {far}")
    impostor = np.sort(scores[~issame])[::-1]
    allowed = int(np.floor(far * len(impostor)))
    # Accepting scores strictly above impostor[allowed] admits at most `allowed` impostors.
    return float(np.nextafter(impostor[allowed], np.inf))


def roc_auc(scores: np.ndarray, issame: np.ndarray) -> float:
    """ROC AUC through the Mann-Whitney U statistic (ties count one half)."""
    ranks = rankdata(scores)
    n_pos = int(issame.sum())
    n_neg = len(scores) - n_pos
    return float((ranks[issame].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def evaluate_pairs(
    scores: np.ndarray,
    issame: np.ndarray,
    folds: np.ndarray | None = None,
    *,
    n_folds: int = 10,
    far: float = 1e-3,
) -> VerificationResult:
    """K-fold verification: each fold's threshold is chosen on the other folds.

    ``folds`` gives each pair's fold (the protocol's own split); when omitted, pairs are
    split into ``n_folds`` contiguous folds. The operating ``threshold`` is the mean of
    the per-fold thresholds.
    """
    scores = np.asarray(scores, dtype=np.float64)
    issame = np.asarray(issame, dtype=bool)
    if folds is None:
        folds = np.arange(len(scores)) * n_folds // max(len(scores), 1)
    folds = np.asarray(folds)
    _validate(scores, issame, folds)
    fold_ids = np.unique(folds)
    if len(fold_ids) < 2:
        raise ValueError("need at least two folds")
    accs, thrs = [], []
    for f in fold_ids:
        test = folds == f
        thr = best_threshold(scores[~test], issame[~test])
        thrs.append(thr)
        accs.append(accuracy_at(scores[test], issame[test], thr))
    far_thr = threshold_at_far(scores, issame, far)
    tar = float(np.mean(scores[issame] >= far_thr))
    return VerificationResult(
        accuracy=float(np.mean(accs)),
        accuracy_std=float(np.std(accs)),
        fold_accuracies=tuple(float(a) for a in accs),
        fold_thresholds=tuple(float(t) for t in thrs),
        threshold=float(np.mean(thrs)),
        tar_at_far=tar,
        far_target=far,
        far_threshold=far_thr,
        auc=roc_auc(scores, issame),
        n_pairs=int(len(scores)),
    )
