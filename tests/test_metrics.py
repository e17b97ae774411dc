import numpy as np
from sklearn.metrics import cohen_kappa_score

from aptos_ray.metrics import (
    apply_cut_points,
    grading_metrics,
    optimise_cut_points,
    quadratic_weighted_kappa,
)


def test_qwk_matches_sklearn_and_handles_constant_predictions():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 300)
    p = np.clip(y + rng.integers(-1, 2, 300), 0, 4)
    assert quadratic_weighted_kappa(y, p) == cohen_kappa_score(y, p, weights="quadratic")
    assert quadratic_weighted_kappa(y, y) == 1.0
    assert quadratic_weighted_kappa([2, 2, 2], [2, 2, 2]) == 0.0  # not NaN


def test_the_seeds_failure_mode_shows_in_per_grade_recall():
    y = np.array([0] * 50 + [1] * 10 + [2] * 25 + [3] * 5 + [4] * 10)
    p = np.where(y == 0, 0, 2)  # "predicts 2 for most images, never 3 or 4"
    m = grading_metrics(y, p, prefix="val_")
    assert m["val_recall_3"] == 0.0 and m["val_recall_4"] == 0.0 and m["val_recall_2"] == 1.0
    assert np.array(m["val_confusion"]).sum() == len(y)
    assert 0 < m["val_qwk"] < 1


def test_optimised_cut_points_never_lose_to_the_defaults():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 5, 400)
    scores = y * 0.6 + rng.normal(0, 0.5, 400)  # compressed, biased regression outputs
    default = quadratic_weighted_kappa(y, apply_cut_points(scores, [0.5, 1.5, 2.5, 3.5]))
    cuts = optimise_cut_points(scores, y)
    assert cuts == sorted(cuts)
    assert quadratic_weighted_kappa(y, apply_cut_points(scores, cuts)) > default + 0.02
