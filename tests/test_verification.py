import numpy as np
import pytest

from advface.metrics.verification import (
    accuracy_at,
    best_threshold,
    evaluate_pairs,
    roc_auc,
    threshold_at_far,
)


def test_separable_scores_give_perfect_accuracy():
    rng = np.random.default_rng(0)
    issame = np.repeat([True, False], 300)
    scores = np.where(issame, rng.uniform(0.6, 1.0, 600), rng.uniform(-0.2, 0.4, 600))
    folds = np.arange(600) % 10
    r = evaluate_pairs(scores, issame, folds)
    assert r.accuracy == 1.0 and r.accuracy_std == 0.0
    assert 0.4 <= r.threshold <= 0.6
    assert r.auc == 1.0 and r.tar_at_far == 1.0
    assert r.n_pairs == 600


def test_best_threshold_matches_brute_force():
    rng = np.random.default_rng(1)
    issame = rng.random(200) < 0.5
    scores = rng.normal(issame.astype(float), 1.0)
    thr = best_threshold(scores, issame)
    brute = max(accuracy_at(scores, issame, t) for t in np.concatenate([scores, [np.inf]]))
    assert accuracy_at(scores, issame, thr) == pytest.approx(brute)


def test_threshold_at_far_admits_at_most_allowed_impostors():
    rng = np.random.default_rng(2)
    issame = np.repeat([True, False], [500, 3000])
    scores = rng.normal(issame.astype(float) * 2, 1.0)
    thr = threshold_at_far(scores, issame, 1e-3)
    assert np.sum(scores[~issame] >= thr) <= 3
    # Lowering the threshold to the next impostor would exceed the budget.
    imp = np.sort(scores[~issame])[::-1]
    assert np.sum(scores[~issame] >= imp[3]) > 3


def test_auc_of_random_scores_is_near_half_and_handles_ties():
    issame = np.array([True, False, True, False])
    assert roc_auc(np.array([1.0, 1.0, 1.0, 1.0]), issame) == 0.5
    assert roc_auc(np.array([0.9, 0.1, 0.8, 0.2]), issame) == 1.0


def test_fold_threshold_is_chosen_without_the_test_fold():
    # Fold 0 is adversarial: its genuines score low. A threshold fitted on all data
    # would differ; the held-out protocol must not peek at fold 0.
    issame = np.tile([True, False], 50)
    scores = np.where(issame, 0.8, 0.2).astype(float)
    folds = np.repeat(np.arange(10), 10)
    scores[(folds == 0) & issame] = 0.1
    r = evaluate_pairs(scores, issame, folds)
    assert r.fold_accuracies[0] == 0.5
    assert all(a == 1.0 for a in r.fold_accuracies[1:])


@pytest.mark.parametrize(
    "scores,issame",
    [
        (np.array([0.1, np.nan]), np.array([True, False])),
        (np.array([0.1, 0.2]), np.array([True, True])),
        (np.zeros((2, 2)), np.zeros((2, 2), bool)),
    ],
)
def test_bad_input_raises(scores, issame):
    with pytest.raises(ValueError):
        evaluate_pairs(scores, issame)
