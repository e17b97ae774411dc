"""Cut-point rules (cv.cut_rule): each does what it says on small arrays and on scores shaped like the
APTOS out-of-fold scores (grade 2 spread towards 3, where maximising QWK over-calls grade 3)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from aptos_ray.config import ConfigError, parse_args
from aptos_ray.cut_rules import (
    CUT_RULES,
    PRIOR_TOLERANCE,
    choose_cut_points,
    count_ratios,
    precisions,
)
from aptos_ray.metrics import apply_cut_points, optimise_cut_points, quadratic_weighted_kappa, qwk_search_score
from aptos_ray.tune.cv_results import cross_fitted, scores_of

APTOS_COUNTS = (1444, 296, 799, 154, 236)  # the shared APTOS images per grade


def aptos_like_oof(seed: int = 0, folds: int = 5) -> pd.DataFrame:
    """Out-of-fold-like regression scores: grade 1 and 3 overlap their neighbours and the grade-2 scores
    lean towards 3, as the default recipe's do on APTOS."""
    rng = np.random.default_rng(seed)
    grades = np.repeat(np.arange(5), APTOS_COUNTS)
    centre = np.array([0.1, 1.1, 2.2, 2.9, 3.6])[grades]
    spread = np.array([0.3, 0.55, 0.55, 0.5, 0.45])[grades]
    scores = centre + spread * rng.standard_normal(len(grades))
    return pd.DataFrame({"id": [str(i) for i in range(len(grades))], "grade": grades,
                         "fold": rng.permutation(len(grades)) % folds, "score": scores})


def counts(grades: np.ndarray) -> np.ndarray:
    return np.bincount(grades, minlength=5)


def test_search_qwk_equals_sklearns_qwk():
    rng = np.random.default_rng(0)
    for _ in range(20):
        y, p = rng.integers(0, 5, 300), rng.integers(0, 5, 300)
        p[:150] = y[:150]
        assert qwk_search_score(y, p) == pytest.approx(quadratic_weighted_kappa(y, p), abs=1e-12)
    assert qwk_search_score(np.array([2, 2]), np.array([2, 2])) == 0.0 == quadratic_weighted_kappa([2, 2], [2, 2])


def test_prior_rule_predicts_each_grade_as_often_as_it_occurs():
    grades = np.array([0, 0, 0, 0, 1, 1, 2, 2, 2, 4])
    scores = np.array([0.0, 0.2, 0.9, 1.6, 1.2, 1.7, 1.8, 2.9, 3.1, 3.3])  # a model that over-grades
    cuts = choose_cut_points(scores, grades, "prior")
    assert counts(apply_cut_points(scores, cuts)).tolist() == counts(grades).tolist() == [4, 2, 3, 0, 1]
    oof = aptos_like_oof()
    cuts = choose_cut_points(oof["score"], oof["grade"], "prior")
    assert np.abs(counts(apply_cut_points(oof["score"], cuts)) - APTOS_COUNTS).max() <= 1


def test_max_qwk_over_calls_grade_3_and_the_prior_rules_do_not():
    oof = aptos_like_oof()
    scores, grades = oof["score"].to_numpy(), oof["grade"].to_numpy()
    qwk_cuts = choose_cut_points(scores, grades, "qwk")
    assert count_ratios(grades, apply_cut_points(scores, qwk_cuts))[3] > 1.5  # the failure the rules address
    cuts = choose_cut_points(scores, grades, "qwk_prior")
    predicted = apply_cut_points(scores, cuts)
    assert np.all(count_ratios(grades, predicted) <= PRIOR_TOLERANCE + 1e-9)
    assert np.all(count_ratios(grades, predicted) >= 1 / PRIOR_TOLERANCE - 1e-9)
    # The constraint costs little QWK and, calling fewer 2s a 3, gains accuracy.
    qwk_predicted = apply_cut_points(scores, qwk_cuts)
    assert quadratic_weighted_kappa(grades, predicted) > quadratic_weighted_kappa(grades, qwk_predicted) - 0.01
    assert (predicted == grades).mean() > (qwk_predicted == grades).mean()


def test_precision_floor_is_met_when_it_can_be():
    oof = aptos_like_oof(1)
    scores, grades = oof["score"].to_numpy(), oof["grade"].to_numpy()
    assert precisions(grades, apply_cut_points(scores, choose_cut_points(scores, grades, "qwk"))).min() < 0.45
    cuts = choose_cut_points(scores, grades, "qwk_precision", min_precision=0.45)
    assert precisions(grades, apply_cut_points(scores, cuts)).min() >= 0.45


def test_precision_of_a_grade_never_called_is_zero_and_absent_grades_are_not_constrained():
    grades, predicted = np.array([0, 0, 1, 1, 2]), np.array([0, 1, 1, 1, 0])
    assert precisions(grades, predicted).tolist() == [0.5, 2 / 3, 0.0]  # grades 3 and 4 do not occur
    assert count_ratios(grades, predicted).tolist() == [1.0, 1.5, 0.0]


def test_bootstrap_rule_is_seeded_and_close_to_the_qwk_cut_points():
    oof = aptos_like_oof(2)
    scores, grades = oof["score"].to_numpy(), oof["grade"].to_numpy()
    a = choose_cut_points(scores, grades, "qwk_bootstrap", seed=3)
    assert a == choose_cut_points(scores, grades, "qwk_bootstrap", seed=3) and a == sorted(a)
    assert np.abs(np.array(a) - optimise_cut_points(scores, grades)).max() < 0.2


@pytest.mark.parametrize("rule", CUT_RULES)
def test_every_rule_gives_four_sorted_cut_points_the_cross_fitting_uses(rule):
    oof = aptos_like_oof(3, folds=3).iloc[::4].reset_index(drop=True)
    cuts = choose_cut_points(oof["score"], oof["grade"], rule)
    assert len(cuts) == 4 and cuts == sorted(cuts)
    scored = cross_fitted(oof, 0.9, rule)
    fold = scored["fold"] == 0
    expected = apply_cut_points(oof.loc[fold, "score"],
                                choose_cut_points(oof.loc[~fold, "score"], oof.loc[~fold, "grade"], rule))
    assert np.array_equal(scored.loc[fold, "predicted"], expected)
    figures = scores_of(scored)
    assert figures["true_counts"] == counts(oof["grade"].to_numpy()).tolist()
    assert sum(figures["predicted_counts"]) == len(oof)


def test_cut_rule_is_a_checked_config_key():
    assert parse_args(["--cv.cut_rule=prior"]).cv.cut_rule == "prior"
    with pytest.raises(ConfigError, match="'cv.cut_rule': input should be 'qwk', 'qwk_bootstrap', 'prior'"):
        parse_args(["--cv.cut_rule=median"])


# --- the report says what made the grades -----------------------------------------------------------


def test_report_shows_predicted_and_true_counts_and_the_rule_that_cut_them(tmp_path):
    from aptos_ray.infer.ensemble import Ensemble
    from aptos_ray.infer.report import write_report

    oof = aptos_like_oof(4).iloc[::5].reset_index(drop=True)
    cuts = [0.5, 1.5, 1.9, 3.9]  # a 2|3 cut that calls most grade-2 images severe
    predictions = pd.DataFrame({"id": oof["id"], "grade": oof["grade"], "score": oof["score"],
                                "predicted": apply_cut_points(oof["score"], cuts)})
    ensemble = Ensemble("cv_runs/x", ["a/model.pt"] * 5, cuts, None, "cv_runs/x", "prior")
    context = {"cut_points": cuts, "cut_rule": ensemble.cut_points_made_by(cuts)}
    metrics = write_report(str(tmp_path), predictions, context, resamples=50)
    called, true = metrics["predicted_grade_counts"][3], metrics["true_grade_counts"][3]
    assert called > 1.5 * true
    for name in ("report.md", "report.html"):
        text = (tmp_path / name).read_text()
        assert "cv.cut_rule=prior on the out-of-fold scores of cv_runs/x" in text
        assert f"grade 3 predicted {called} times for {true}" in text  # the over-called grade is named
        assert "predicted / true" in text and f"{called / true:.2f}" in text
    single = Ensemble("runs/a", ["runs/a/model.pt"], None, None)
    assert single.cut_points_made_by([0.5, 1.5, 2.5, 3.5]) == "maximising QWK on the run's validation split"
