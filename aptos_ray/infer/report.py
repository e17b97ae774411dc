"""The evaluation report of a prediction run: metrics.json, report.md and a self-contained report.html.

Computed from ``predictions.parquet`` (rows with a known grade): QWK with a seeded bootstrap
95% interval, accuracy, Cohen kappa, per-grade precision and recall, the confusion matrix, and
the clinical view: referable DR (grade >= 2) sensitivity and specificity at the model's operating
point (predicted grade >= 2) with the ROC curve of its continuous referable score.

The HTML embeds its figures as base64 PNG, so it opens anywhere, without Python or other files.
"""

from __future__ import annotations

import io
import json
from datetime import datetime, timezone

import numpy as np
import pandas as pd
from sklearn.metrics import precision_recall_fscore_support, roc_auc_score, roc_curve

from aptos_ray import figures, storage
from aptos_ray.config import Config, ConfigError
from aptos_ray.data.format import GRADE_NAMES
from aptos_ray.infer.outputs import EXPLAIN_INDEX, FIGURES, QUALITY_SHEET, read_predictions
from aptos_ray.infer.report_render import build_report, fmt, pct, qwk_text, to_html, to_markdown
from aptos_ray.metrics import NUM_GRADES, REFERABLE_GRADE, grading_metrics

RESAMPLES = 1000
SEED = 0
# The starting point this project improves on: the seed notebook's hold-out figures.
SEED_BASELINE = {"accuracy": 0.719, "cohen_kappa": 0.547, "n": 733,
                 "source": "the original notebook's figures on its 733 APTOS 2019 hold-out images"}


# --------------------------------------------------------------------------- numbers


def qwk_from_confusions(confusions: np.ndarray) -> np.ndarray:
    """QWK of each (K, K) confusion matrix in a (B, K, K) stack, 0 where it is undefined.

    The same formula as sklearn's ``cohen_kappa_score(weights="quadratic")``:
    1 - sum(W * observed) / sum(W * expected), W_ij = (i - j)^2, expected = outer(row, col) / n.
    """
    k = confusions.shape[-1]
    weights = (np.arange(k)[:, None] - np.arange(k)[None, :]) ** 2
    n = confusions.sum(axis=(1, 2), keepdims=True)
    expected = confusions.sum(axis=2, keepdims=True) * confusions.sum(axis=1, keepdims=True) / np.maximum(n, 1)
    observed = (weights * confusions).sum(axis=(1, 2))
    chance = (weights * expected).sum(axis=(1, 2))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(chance > 0, 1.0 - observed / chance, 0.0)


def bootstrap_qwk(y_true, y_pred, resamples: int = RESAMPLES, seed: int = SEED, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of QWK over images (resampled with replacement).

    Vectorised: each resample is only a confusion matrix, built with one bincount, so
    1000 resamples of 3,662 images take well under a second.
    """
    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    n = len(y_true)
    if n == 0:
        return 0.0, 0.0
    rng = np.random.default_rng(seed)
    pairs = y_true * NUM_GRADES + y_pred
    # Resamples in chunks of ~4M draws: the same draws as one (resamples, n) array (the generator
    # runs on in order), without its gigabytes at EyePACS size (1000 x 88,702 x 8 bytes, twice).
    chunk = max(1, (1 << 22) // n)
    confusions = []
    for start in range(0, resamples, chunk):
        k = min(chunk, resamples - start)
        cells = pairs[rng.integers(0, n, size=(k, n))] + (np.arange(k) * NUM_GRADES**2)[:, None]
        confusions.append(np.bincount(cells.ravel(), minlength=k * NUM_GRADES**2).reshape(k, NUM_GRADES, NUM_GRADES))
    values = qwk_from_confusions(np.concatenate(confusions))
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(values, [tail, 100 - tail])
    return float(lo), float(hi)


def wilson_interval(successes: int, total: int, z: float = 1.96) -> tuple[float, float] | None:
    """95% interval of a proportion (Wilson score): sensible at 0%, 100% and small counts."""
    if total == 0:
        return None
    p = successes / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * np.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def _ratio(a: int, b: int) -> float | None:
    return a / b if b else None


def referable_metrics(y_true: np.ndarray, y_pred: np.ndarray, score: np.ndarray, score_name: str) -> dict:
    """Referable DR (grade >= 2) at the operating point predicted grade >= 2, and the ROC of ``score``."""
    truth, flagged = y_true >= REFERABLE_GRADE, y_pred >= REFERABLE_GRADE
    tp, fn = int((truth & flagged).sum()), int((truth & ~flagged).sum())
    tn, fp = int((~truth & ~flagged).sum()), int((~truth & flagged).sum())
    out = {
        "definition": f"true grade >= {REFERABLE_GRADE} ({GRADE_NAMES[REFERABLE_GRADE]} NPDR or worse)",
        "operating_point": f"predicted grade >= {REFERABLE_GRADE}",
        "score": score_name,
        "positives": tp + fn, "negatives": tn + fp, "tp": tp, "fn": fn, "tn": tn, "fp": fp,
        "sensitivity": _ratio(tp, tp + fn), "sensitivity_ci95": wilson_interval(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp), "specificity_ci95": wilson_interval(tn, tn + fp),
        "ppv": _ratio(tp, tp + fp), "npv": _ratio(tn, tn + fn),
        "auc": None, "roc": None,
    }
    usable = np.isfinite(score)
    if truth[usable].any() and (~truth[usable]).any():  # AUC needs both classes
        fpr, tpr, _ = roc_curve(truth[usable], score[usable])
        out["auc"] = float(roc_auc_score(truth[usable], score[usable]))
        out["roc"] = {"fpr": [round(float(v), 5) for v in fpr], "tpr": [round(float(v), 5) for v in tpr]}
    return out


def referral_point(y_true: np.ndarray, labelled: pd.DataFrame, referral: dict | None) -> dict | None:
    """Sensitivity and specificity of the ``refer`` column (a cross-validated ensemble's threshold on
    the continuous score, ``infer.ensemble``), beside the grade-based operating point; None without it."""
    if "refer" not in labelled:
        return None
    truth, flagged = y_true >= REFERABLE_GRADE, labelled["refer"].to_numpy(dtype=bool)
    tp, fn = int((truth & flagged).sum()), int((truth & ~flagged).sum())
    tn, fp = int((~truth & ~flagged).sum()), int((~truth & flagged).sum())
    return {"operating_point": "score >= %.4g" % referral["threshold"] if referral else "refer",
            "target_sensitivity": referral.get("target_sensitivity") if referral else None,
            "tp": tp, "fn": fn, "tn": tn, "fp": fp,
            "sensitivity": _ratio(tp, tp + fn), "sensitivity_ci95": wilson_interval(tp, tp + fn),
            "specificity": _ratio(tn, tn + fp), "specificity_ci95": wilson_interval(tn, tn + fp)}


def per_grade(y_true: np.ndarray, y_pred: np.ndarray) -> list[dict]:
    labels = list(range(NUM_GRADES))
    precision, recall, _, support = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    predicted = np.bincount(y_pred, minlength=NUM_GRADES)[:NUM_GRADES]
    return [{"grade": g, "name": GRADE_NAMES[g], "support": int(support[g]), "predicted": int(predicted[g]),
             "precision": float(precision[g]) if predicted[g] else None,
             "recall": float(recall[g]) if support[g] else None} for g in labels]


def referable_score(predictions: pd.DataFrame) -> tuple[np.ndarray, str]:
    """P(grade >= 2) when the model gives probabilities (classification), else its grade score."""
    if "p_referable" in predictions and predictions["p_referable"].notna().all():
        return predictions["p_referable"].to_numpy(dtype=float), "P(grade >= 2)"
    return predictions["score"].to_numpy(dtype=float), "continuous grade score"


def compute_metrics(predictions: pd.DataFrame, resamples: int = RESAMPLES, seed: int = SEED,
                    referral: dict | None = None) -> dict:
    """Everything metrics.json holds, from the labelled rows of ``predictions``."""
    labelled = predictions[predictions["grade"] >= 0]
    if labelled.empty:
        raise ConfigError("no labelled predictions (grade >= 0): the report needs the true grades; predict a "
                          "labelled input (a CSV with a diagnosis column or a prepared split)")
    y_true = labelled["grade"].to_numpy(dtype=np.int64)
    y_pred = labelled["predicted"].to_numpy(dtype=np.int64)
    score, score_name = referable_score(labelled)
    base = grading_metrics(y_true, y_pred)  # the definitions training reports, so the numbers agree
    lo, hi = bootstrap_qwk(y_true, y_pred, resamples, seed)
    return {
        "n": int(len(labelled)),
        "num_unlabelled": int(len(predictions) - len(labelled)),
        "qwk": base["qwk"],
        "qwk_ci95": [lo, hi],
        "bootstrap": {"resamples": resamples, "seed": seed, "method": "percentile, images resampled with replacement"},
        "accuracy": base["acc"],
        "cohen_kappa": base["kappa"],
        "per_grade": per_grade(y_true, y_pred),
        "confusion": base["confusion"],
        "referable": {**referable_metrics(y_true, y_pred, score, score_name),
                      "referral": referral_point(y_true, labelled, referral)},
        "true_grade_counts": np.bincount(y_true, minlength=NUM_GRADES)[:NUM_GRADES].tolist(),
        "predicted_grade_counts": np.bincount(y_pred, minlength=NUM_GRADES)[:NUM_GRADES].tolist(),
        "baseline": SEED_BASELINE,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


# --------------------------------------------------------------------------- screening: quality and heatmaps


def quality_metrics(predictions: pd.DataFrame, resamples: int = RESAMPLES, seed: int = SEED) -> dict | None:
    """Counts by verdict, the ungradable rows, and the headline metrics on gradable labelled rows."""
    if "gradable" not in predictions:
        return None
    gradable = predictions["gradable"].astype(bool)
    bad = predictions[~gradable]
    cols = [c for c in ("id", "quality_reason", "grade", "predicted") if c in bad]
    out = {
        "num_gradable": int(gradable.sum()), "num_ungradable": int((~gradable).sum()),
        "reasons": {str(k): int(v) for k, v in bad["quality_reason"].value_counts().items()},
        "ungradable": bad[cols].astype({"grade": int, "predicted": int}).to_dict("records"),
        "gradable_metrics": None,
    }
    labelled = predictions[gradable & (predictions["grade"] >= 0)]
    if len(labelled):
        m = compute_metrics(labelled, resamples, seed)
        out["gradable_metrics"] = {k: m[k] for k in ("n", "qwk", "qwk_ci95", "accuracy", "cohen_kappa", "referable")}
    return out


def screening_files(output: str) -> dict:
    """The contact sheet and the Grad-CAM overlays predict wrote into ``output``, when there."""
    found: dict = {}
    try:
        found["sheet"] = storage.read_bytes(storage.join(output, QUALITY_SHEET))
    except (FileNotFoundError, OSError):
        pass
    try:
        index = pd.read_csv(io.StringIO(storage.read_text(storage.join(output, EXPLAIN_INDEX))),
                            dtype={"id": str})
        index["png"] = [storage.read_bytes(storage.join(output, f)) for f in index["file"]]
        found["explain"] = index
    except (FileNotFoundError, OSError, pd.errors.EmptyDataError):
        pass
    return found


# --------------------------------------------------------------------------- files and the job


def write_report(output: str, predictions: pd.DataFrame, context: dict | None = None,
                 resamples: int = RESAMPLES, seed: int = SEED) -> dict:
    """metrics.json, report.md, report.html and the PNG figures in ``output``; returns the metrics."""
    context = context or {}
    referral = (context.get("ensemble") or {}).get("referral")  # a cross-validated ensemble's threshold
    metrics = compute_metrics(predictions, resamples, seed, referral)
    metrics["quality"] = quality_metrics(predictions, resamples, seed)
    pngs = {key: figures.png(figure) for key, figure in report_figures(metrics).items()}
    for key, name in FIGURES.items():
        storage.write_bytes(storage.join(output, name), pngs[key])
    report = build_report(metrics, context, pngs, screening_files(output))
    storage.write_text(storage.join(output, "metrics.json"), json.dumps(metrics, indent=2))
    storage.write_text(storage.join(output, "report.md"), to_markdown(report))
    storage.write_text(storage.join(output, "report.html"), to_html(report))
    return metrics


def report_figures(m: dict) -> dict:
    """The report's figures by ``FIGURES`` key."""
    return {"confusion": figures.confusion_matrix(m["confusion"], f"Confusion matrix ({m['n']} images)"),
            "roc": figures.roc(m["referable"]),
            "grades": figures.grouped_bars({"true (graders)": m["true_grade_counts"],
                                            "predicted (model)": m["predicted_grade_counts"]}, "Images per grade")}


def evaluate(cfg: Config) -> dict:
    """The evaluate job: the report of ``<predict.output>/predictions.parquet``."""
    output = cfg.predict.output
    predictions = read_predictions(output)
    try:
        context = json.loads(storage.read_text(storage.join(output, "predict.json")))
    except FileNotFoundError:
        context = {}
    metrics = write_report(output, predictions, context)
    print(summary_text(metrics))
    print(f"report: {storage.join(output, 'report.html')} (also report.md, metrics.json)")
    return metrics


def summary_text(m: dict) -> str:
    r = m["referable"]
    return (f"{m['n']} labelled images: QWK {qwk_text(m)}, accuracy {m['accuracy']:.3f}, "
            f"Cohen kappa {m['cohen_kappa']:.3f}\n"
            f"referable DR (grade >= 2): sensitivity {pct(r['sensitivity'])}, specificity "
            f"{pct(r['specificity'])}, AUC {fmt(r['auc'])}"
            + (f"\nreferral point ({r['referral']['operating_point']}): sensitivity "
               f"{pct(r['referral']['sensitivity'])}, specificity {pct(r['referral']['specificity'])}"
               if r.get("referral") else ""))
