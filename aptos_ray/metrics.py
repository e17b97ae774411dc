"""Grading metrics (scikit-learn) and the regression head's cut-points."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    cohen_kappa_score,
    confusion_matrix,
    recall_score,
)

NUM_GRADES = 5
DEFAULT_CUT_POINTS = [0.5, 1.5, 2.5, 3.5]


def quadratic_weighted_kappa(y_true, y_pred) -> float:
    """The APTOS 2019 competition metric. 0.0 (not NaN) when either side is constant."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if len(y_true) == 0 or (len(np.unique(y_true)) < 2 and len(np.unique(y_pred)) < 2):
        return 0.0
    value = cohen_kappa_score(y_true, y_pred, weights="quadratic", labels=list(range(NUM_GRADES)))
    return 0.0 if np.isnan(value) else float(value)


def qwk_search_score(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """QWK from the confusion matrix, for searches that evaluate it thousands of times.

    The same quantity as ``quadratic_weighted_kappa`` (to rounding), written out because
    scikit-learn's per-call input checks cost about 8 ms on 2,000 images, 50x the arithmetic,
    which made a bootstrap of cut-point searches take minutes.
    """
    observed = np.bincount(y_true * NUM_GRADES + y_pred, minlength=NUM_GRADES**2).reshape(NUM_GRADES, NUM_GRADES)
    n = observed.sum()
    if n == 0:
        return 0.0
    grades = np.arange(NUM_GRADES)
    weights = (grades[:, None] - grades[None, :]) ** 2
    expected = np.outer(observed.sum(axis=1), observed.sum(axis=0)) / n
    disagreement = float((weights * expected).sum())
    return 0.0 if disagreement == 0 else 1.0 - float((weights * observed).sum()) / disagreement


def grading_metrics(y_true, y_pred, prefix: str = "") -> dict:
    """Accuracy, Cohen kappa, QWK, per-grade recall and the confusion matrix (as nested lists)."""
    y_true, y_pred = np.asarray(y_true, dtype=int), np.asarray(y_pred, dtype=int)
    labels = list(range(NUM_GRADES))
    kappa = cohen_kappa_score(y_true, y_pred, labels=labels) if len(y_true) else 0.0
    recall = recall_score(y_true, y_pred, labels=labels, average=None, zero_division=0)
    metrics = {
        "acc": float(accuracy_score(y_true, y_pred)) if len(y_true) else 0.0,
        "kappa": 0.0 if np.isnan(kappa) else float(kappa),
        "qwk": quadratic_weighted_kappa(y_true, y_pred),
        **{f"recall_{g}": float(r) for g, r in zip(labels, recall)},
        "confusion": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }
    return {f"{prefix}{k}": v for k, v in metrics.items()}


def apply_cut_points(scores, cut_points) -> np.ndarray:
    """Continuous grade scores -> grades 0..4 by thresholds: THE decoding of a score, used by the
    cut-point optimiser, validation, predict, export and cross-validation alike.

    A score equal to a cut-point takes the higher grade (``cut[k-1] <= score < cut[k]`` is grade k);
    cut-points are sorted first (the optimiser may swap them). Compared in float64, so a float32
    score and a fitted cut such as 1.4625 compare the same way wherever they are decoded.
    """
    return np.digitize(np.asarray(scores, dtype=float), np.sort(np.asarray(cut_points, dtype=float)))


def optimise_cut_points(scores, y_true, start=DEFAULT_CUT_POINTS, rounds: int = 3) -> list[float]:
    """Thresholds that maximise QWK, by coordinate search on a grid.

    Written by hand (rather than scipy.optimize.minimize with Nelder-Mead, the usual Kaggle
    recipe) because QWK is piecewise constant in the thresholds: a grid over each one in turn
    is deterministic and never worse than the starting point.
    """
    scores, y_true = np.asarray(scores, dtype=float), np.asarray(y_true, dtype=int)
    cuts = list(start)
    best = qwk_search_score(y_true, apply_cut_points(scores, cuts))
    for _ in range(rounds):
        for i in range(len(cuts)):
            low = cuts[i - 1] + 0.01 if i else cuts[i] - 1.0
            high = cuts[i + 1] - 0.01 if i + 1 < len(cuts) else cuts[i] + 1.0
            for candidate in np.linspace(low, high, 41):
                trial = cuts[:i] + [float(candidate)] + cuts[i + 1 :]
                value = qwk_search_score(y_true, apply_cut_points(scores, trial))
                if value > best + 1e-12:
                    best, cuts = value, trial
    return [round(c, 4) for c in cuts]


# --- referable DR: the operating point of a continuous score -------------------------------------

REFERABLE_GRADE = 2  # moderate NPDR or worse: refer to an ophthalmologist


def referral_threshold(scores, y_true, target_sensitivity: float) -> float | None:
    """The highest threshold t at which ``score >= t`` flags at least ``target_sensitivity`` of the
    referable images (true grade >= 2): the most specific point that still meets the target. None
    without referable images."""
    scores, referable = np.asarray(scores, dtype=float), np.asarray(y_true) >= REFERABLE_GRADE
    positives = np.sort(scores[referable])[::-1]
    if len(positives) == 0:
        return None
    needed = int(np.ceil(target_sensitivity * len(positives) - 1e-9))
    return float(positives[max(needed, 1) - 1])


def referral_rates(scores, y_true, threshold: float) -> dict:
    """Sensitivity and specificity of ``score >= threshold`` for referable DR."""
    flagged, referable = np.asarray(scores, dtype=float) >= threshold, np.asarray(y_true) >= REFERABLE_GRADE
    sens = float(flagged[referable].mean()) if referable.any() else None
    spec = float((~flagged[~referable]).mean()) if (~referable).any() else None
    return {"threshold": float(threshold), "sensitivity": sens, "specificity": spec}


def referable_calibration(scores, y_true) -> tuple[float, float] | None:
    """(a, b) of P(referable | score) = 1 / (1 + exp(-(a * score + b))), fitted by logistic regression
    (Platt scaling) on out-of-fold scores; None unless both classes are present."""
    from sklearn.linear_model import LogisticRegression

    scores, referable = np.asarray(scores, dtype=float).reshape(-1, 1), np.asarray(y_true) >= REFERABLE_GRADE
    if referable.all() or not referable.any():
        return None
    fit = LogisticRegression(C=1e4).fit(scores, referable)
    return float(fit.coef_[0, 0]), float(fit.intercept_[0])


def p_referable(scores, calibration: tuple[float, float]) -> np.ndarray:
    a, b = calibration
    return 1.0 / (1.0 + np.exp(-(a * np.asarray(scores, dtype=float) + b)))
