"""Rules that choose the regression head's cut-points from scores of images with known grades
(``cv.cut_rule``; cross-validation applies the rule to its out-of-fold scores).

- ``qwk``: maximise QWK on all the scores. Quadratic weighting barely punishes calling a 2 a 3, so
  on APTOS it moves the 2|3 cut down and over-calls the rare severe grade.
- ``qwk_bootstrap``: the median, cut by cut, of the QWK cut-points of bootstrap resamples of the
  scores: less at the mercy of the few images that sit near a cut.
- ``prior``: the predicted share of each grade equals its share among the true grades (each cut
  at the matching quantile of the scores): no grade is over- or under-called on those images.
- ``qwk_prior``: maximise QWK while every grade's predicted count stays within ``PRIOR_TOLERANCE``
  times its true count (between today's rule and ``prior``).
- ``qwk_precision``: maximise QWK while every grade's precision is at least ``MIN_PRECISION``
  (when no cut-points reach it, the ones that come closest).

The constrained rules search with scipy's differential evolution: QWK is piecewise constant in the
cut-points, so gradient methods see a zero gradient; evolution needs none, handles the constraints
(feasibility first) and is seeded, so the same scores give the same cut-points.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from scipy.optimize import NonlinearConstraint, differential_evolution

from aptos_ray.metrics import NUM_GRADES, apply_cut_points, optimise_cut_points, qwk_search_score

CUT_RULES = ("qwk", "qwk_bootstrap", "prior", "qwk_prior", "qwk_precision")
BOOTSTRAP_RESAMPLES = 25
PRIOR_TOLERANCE = 1.25  # qwk_prior: predicted count of a grade within [1/1.25, 1.25] x its true count
MIN_PRECISION = 0.5  # qwk_precision: the floor on every grade's precision


def choose_cut_points(scores, grades, rule: str, min_precision: float = MIN_PRECISION, seed: int = 0) -> list[float]:
    """The cut-points ``rule`` picks for ``scores`` (continuous grade scores) of images graded ``grades``."""
    scores, grades = np.asarray(scores, dtype=float), np.asarray(grades, dtype=np.int64)
    if rule == "qwk":
        return optimise_cut_points(scores, grades)
    if rule == "qwk_bootstrap":
        return bootstrap_cut_points(scores, grades, seed)
    if rule == "prior":
        return prior_cut_points(scores, grades)
    if rule == "qwk_prior":
        return constrained_qwk_cut_points(scores, grades, lambda p: count_ratios(grades, p),
                                          1 / PRIOR_TOLERANCE, PRIOR_TOLERANCE, seed)
    if rule == "qwk_precision":
        return constrained_qwk_cut_points(scores, grades, lambda p: precisions(grades, p),
                                          min_precision, np.inf, seed)
    raise ValueError(f"unknown cut rule {rule!r}: one of {', '.join(CUT_RULES)}")  # the config checks it first


def bootstrap_cut_points(scores: np.ndarray, grades: np.ndarray, seed: int = 0,
                         resamples: int = BOOTSTRAP_RESAMPLES) -> list[float]:
    rng = np.random.default_rng(seed)
    fits = []
    for _ in range(resamples):
        rows = rng.integers(0, len(scores), len(scores))
        fits.append(sorted(optimise_cut_points(scores[rows], grades[rows])))
    return [round(float(c), 4) for c in np.median(np.asarray(fits), axis=0)]


def prior_cut_points(scores: np.ndarray, grades: np.ndarray) -> list[float]:
    """Cut k halfway between the scores ranked n_{<=k} and n_{<=k} + 1 (``midpoint`` quantiles), so
    exactly as many images get grade <= k as truly have it (ties in the scores aside)."""
    cumulative = np.cumsum(np.bincount(grades, minlength=NUM_GRADES))[:-1] / len(grades)
    return [float(c) for c in np.quantile(scores, cumulative, method="midpoint")]  # unrounded: exact counts


def count_ratios(grades: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """Predicted count / true count of each grade that occurs (a missing grade is not constrained)."""
    true = np.bincount(grades, minlength=NUM_GRADES)
    called = np.bincount(predicted, minlength=NUM_GRADES)
    present = true > 0
    return called[present] / true[present]


def precisions(grades: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """Precision of each grade that occurs; 0 for a grade never predicted (it must be called to count)."""
    confusion = np.bincount(grades * NUM_GRADES + predicted, minlength=NUM_GRADES**2).reshape(NUM_GRADES, NUM_GRADES)
    called = confusion.sum(axis=0)
    present = confusion.sum(axis=1) > 0
    return np.divide(np.diag(confusion), called, out=np.zeros(NUM_GRADES), where=called > 0)[present]


def constrained_qwk_cut_points(scores: np.ndarray, grades: np.ndarray,
                               constraint: Callable[[np.ndarray], np.ndarray],
                               lower: float, upper: float, seed: int = 0) -> list[float]:
    """Maximise QWK subject to ``lower <= constraint(predicted grades) <= upper``, started from the
    unconstrained QWK cut-points (kept when they already satisfy the constraint and nothing better does)."""
    start = np.clip(sorted(optimise_cut_points(scores, grades)), scores.min(), scores.max())
    bounds = [(float(scores.min()), float(scores.max()))] * (NUM_GRADES - 1)

    def population_grades(cuts: np.ndarray) -> list[np.ndarray]:  # cuts: (4, members), as vectorized=True passes them
        return [apply_cut_points(scores, np.sort(member)) for member in np.atleast_2d(cuts.T)]

    # Vectorized: one call per generation rather than per member, which costs scipy's per-call overhead
    # (most of the time here) once a generation.
    result = differential_evolution(
        lambda cuts: np.array([-qwk_search_score(grades, p) for p in population_grades(cuts)]), bounds,
        constraints=NonlinearConstraint(
            lambda cuts: np.array([constraint(p) for p in population_grades(cuts)]).T, lower, upper),
        x0=start, rng=seed, polish=False, maxiter=200, tol=1e-6, vectorized=True, updating="deferred")
    return [float(c) for c in np.sort(result.x)]  # unrounded: rounding may move a cut past a score and break the constraint
