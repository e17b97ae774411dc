"""The evaluation report of a prediction run: metrics.json, report.md and a self-contained report.html.

Computed from ``predictions.parquet`` (rows with a known grade): QWK with a seeded bootstrap
95% interval, accuracy, Cohen kappa, per-grade precision and recall, the confusion matrix, and
the clinical view: referable DR (grade >= 2) sensitivity and specificity at the model's operating
point (predicted grade >= 2) with the ROC curve of its continuous referable score.

The HTML embeds its figures as base64 PNG, so it opens anywhere, without Python or other files.
"""

from __future__ import annotations

import base64
import html
import io
import json
from datetime import datetime, timezone

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from sklearn.metrics import precision_recall_fscore_support, roc_auc_score, roc_curve  # noqa: E402

from aptos_ray import plots, storage  # noqa: E402
from aptos_ray.config import Config, ConfigError  # noqa: E402
from aptos_ray.metrics import NUM_GRADES, grading_metrics  # noqa: E402
from aptos_ray.records import GRADE_NAMES  # noqa: E402

REFERABLE_GRADE = 2  # moderate NPDR or worse: the usual referral threshold in DR screening
RESAMPLES = 1000
SEED = 0
# The starting point this project improves on: the seed notebook's hold-out figures.
SEED_BASELINE = {"accuracy": 0.719, "cohen_kappa": 0.547, "n": 733,
                 "source": "the original notebook's figures on its 733 APTOS 2019 hold-out images"}
REPORT_FILES = ("metrics.json", "report.md", "report.html")
FIGURES = {"confusion": "confusion_matrix.png", "roc": "roc_referable.png", "grades": "grade_distribution.png"}


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
    idx = rng.integers(0, n, size=(resamples, n))
    cells = y_true[idx] * NUM_GRADES + y_pred[idx] + (np.arange(resamples) * NUM_GRADES**2)[:, None]
    confusions = np.bincount(cells.ravel(), minlength=resamples * NUM_GRADES**2).reshape(resamples, NUM_GRADES, NUM_GRADES)
    values = qwk_from_confusions(confusions)
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


def compute_metrics(predictions: pd.DataFrame, resamples: int = RESAMPLES, seed: int = SEED) -> dict:
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
        "referable": referable_metrics(y_true, y_pred, score, score_name),
        "true_grade_counts": np.bincount(y_true, minlength=NUM_GRADES)[:NUM_GRADES].tolist(),
        "predicted_grade_counts": np.bincount(y_pred, minlength=NUM_GRADES)[:NUM_GRADES].tolist(),
        "baseline": SEED_BASELINE,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


# --------------------------------------------------------------------------- figures


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def roc_figure(referable: dict) -> bytes:
    """ROC of the referable score, with the operating point (predicted grade >= 2) marked."""
    fig, ax = plt.subplots(figsize=(4.8, 4.4))
    ax.plot([0, 1], [0, 1], ":", color="grey", label="chance")
    if referable["roc"]:
        ax.plot(referable["roc"]["fpr"], referable["roc"]["tpr"], "-", lw=2,
                label=f"{referable['score']} (AUC {referable['auc']:.3f})")
    else:
        ax.text(0.5, 0.4, "ROC undefined:\nonly one class present", ha="center")
    if referable["sensitivity"] is not None and referable["specificity"] is not None:
        ax.plot(1 - referable["specificity"], referable["sensitivity"], "o", ms=9, color="crimson",
                label=f"operating point ({referable['operating_point']})")
    ax.set(xlabel="1 - specificity (false-positive rate)", ylabel="sensitivity (true-positive rate)",
           title="Referable DR (grade >= 2)", xlim=(-0.02, 1.02), ylim=(-0.02, 1.02))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=7)
    return _png(fig)


def grade_distribution_figure(true_counts: list[int], predicted_counts: list[int]) -> bytes:
    """True vs predicted images per grade: shows a model that over- or under-calls a grade."""
    fig, ax = plt.subplots(figsize=(5.6, 3.4))
    x = np.arange(NUM_GRADES)
    ax.bar(x - 0.2, true_counts, 0.4, label="true (graders)")
    ax.bar(x + 0.2, predicted_counts, 0.4, label="predicted (model)")
    ax.set_xticks(x, [f"{g}\n{n}" for g, n in enumerate(GRADE_NAMES)], fontsize=7)
    ax.set(ylabel="images", title="Images per grade")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    return _png(fig)


def figures(metrics: dict) -> dict[str, bytes]:
    return {
        "confusion": plots.confusion_matrix(metrics["confusion"], f"Confusion matrix ({metrics['n']} images)"),
        "roc": roc_figure(metrics["referable"]),
        "grades": grade_distribution_figure(metrics["true_grade_counts"], metrics["predicted_grade_counts"]),
    }


# --------------------------------------------------------------------------- text


def _f(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _pct(value, ci=None) -> str:
    if value is None:
        return "n/a"
    text = f"{100 * value:.1f}%"
    return f"{text} (95% CI {100 * ci[0]:.1f}-{100 * ci[1]:.1f}%)" if ci else text


def _qwk_text(m: dict) -> str:
    return f"{m['qwk']:.3f} (95% CI {m['qwk_ci95'][0]:.3f} to {m['qwk_ci95'][1]:.3f})"


def headline(m: dict) -> list[tuple[str, str, str]]:
    """(label, value, one-line meaning) for the box at the top."""
    r = m["referable"]
    return [
        ("Quadratic weighted kappa", _qwk_text(m),
         "agreement with the graders on the 0-4 scale; 1 = perfect, 0 = chance (competition metric)"),
        ("Referable DR sensitivity", _pct(r["sensitivity"], r["sensitivity_ci95"]),
         f"of {r['positives']} images with grade >= 2, the share the model flags for referral"),
        ("Referable DR specificity", _pct(r["specificity"], r["specificity_ci95"]),
         f"of {r['negatives']} images with grade 0-1, the share the model correctly does not refer"),
        ("ROC AUC (referable)", _f(r["auc"]), f"how well {r['score']} ranks referable above non-referable images"),
        ("Images evaluated", str(m["n"]), "labelled images with a prediction"),
    ]


EXPLAIN = {
    "qwk": "Quadratic weighted kappa counts how far each prediction is from the graders' grade and "
           "weighs a miss by the square of the distance, corrected for chance agreement: calling a "
           "grade 4 eye grade 0 costs 16 times more than calling it grade 3. It was the APTOS 2019 "
           "competition metric. The interval comes from re-scoring {resamples} bootstrap resamples of "
           "the images (seed {seed}); it shows how much the number would move on another set of "
           "images like these.",
    "accuracy": "Accuracy is the share of images graded exactly right. Easy to read but blind to how wrong the misses are, "
                "and flattered by the many grade 0 images.",
    "kappa": "Cohen kappa: exact agreement corrected for chance, every miss counted alike.",
    "referable": "Screening programmes refer an eye to an ophthalmologist at moderate non-proliferative "
                 "DR (grade 2) or worse. Sensitivity is the share of such images the model flags "
                 "(missed ones are the dangerous errors), specificity the share of grade 0-1 images it "
                 "lets pass (false alarms cost clinic time). The operating point is the model's own "
                 "grade (predicted >= 2); the ROC curve shows every other threshold on its continuous "
                 "score, and the AUC summarises it (0.5 = chance, 1 = perfect ranking). Intervals are "
                 "Wilson 95% intervals.",
    "per_grade": "Precision: of the images the model gave this grade, the share that truly have it. "
                 "Recall: of the images with this grade, the share the model found. The confusion "
                 "matrix shows where each true grade went (rows: graders, columns: model).",
}


def caveats(m: dict, context: dict) -> list[str]:
    notes = []
    if m["n"] < 200:
        notes.append(f"Only {m['n']} labelled images: every figure here is uncertain; read the intervals, not the points.")
    absent = [GRADE_NAMES[g] for g in range(NUM_GRADES) if m["true_grade_counts"][g] == 0]
    if absent:
        notes.append(f"No images of grade(s) {', '.join(absent)} among the labelled inputs: their recall is undefined.")
    if m["num_unlabelled"]:
        notes.append(f"{m['num_unlabelled']} predicted image(s) have no known grade and are not part of these numbers.")
    if context.get("num_unreadable"):
        notes.append(f"{context['num_unreadable']} input(s) could not be read and were not predicted (see unreadable.csv).")
    notes.append("The seed baseline was measured on its own 733 hold-out images; unless these are the same images, "
                 "the comparison is indicative only.")
    notes.append("A retrospective evaluation on graded photographs, not a clinical validation: image quality, camera "
                 "and population shifts change these numbers.")
    return notes


def context_lines(context: dict) -> list[tuple[str, str]]:
    lines = []
    if context.get("checkpoint"):
        lines.append(("Model", f"{context.get('model', '?')} ({context.get('head', '?')} head), epoch "
                               f"{context.get('epoch', '?')}, {context['checkpoint']}"))
    if context.get("input"):
        inp = context["input"]
        split = f", split {inp['split']}" if inp.get("split") else ""
        lines.append(("Images", f"{inp.get('kind')} {inp.get('path')}{split}"))
    val = context.get("checkpoint_val_metrics") or {}
    if "val_qwk" in val:
        lines.append(("Validation in training", f"QWK {val['val_qwk']:.3f}, accuracy {val.get('val_acc', float('nan')):.3f} "
                                                f"on {val.get('val_images', '?')} validation images"))
    if "tta" in context:
        lines.append(("Test-time augmentation", f"{context['tta']} extra views" if context["tta"] else "none"))
    if context.get("cut_points"):
        lines.append(("Cut-points", ", ".join(f"{c:.3f}" for c in context["cut_points"])))
    if "num_inputs" in context:
        lines.append(("Inputs", f"{context['num_inputs']} ({context.get('num_predicted', '?')} predicted, "
                                f"{context.get('num_unreadable', 0)} unreadable)"))
    return lines


def comparison_rows(m: dict) -> list[tuple[str, str, str]]:
    b = m["baseline"]
    return [("Accuracy", _f(m["accuracy"]), _f(b["accuracy"])),
            ("Cohen kappa", _f(m["cohen_kappa"]), _f(b["cohen_kappa"])),
            ("Quadratic weighted kappa", _f(m["qwk"]), "not reported"),
            ("Images", str(m["n"]), str(b["n"]))]


def grade_rows(m: dict) -> list[tuple[str, ...]]:
    return [(f"{g['grade']} {g['name']}", str(g["support"]), str(g["predicted"]), _f(g["precision"]), _f(g["recall"]))
            for g in m["per_grade"]]


def referable_rows(m: dict) -> list[tuple[str, str]]:
    r = m["referable"]
    return [("Sensitivity", f"{_pct(r['sensitivity'], r['sensitivity_ci95'])}, {r['tp']} of {r['positives']}"),
            ("Specificity", f"{_pct(r['specificity'], r['specificity_ci95'])}, {r['tn']} of {r['negatives']}"),
            ("Positive predictive value", _pct(r["ppv"])),
            ("Negative predictive value", _pct(r["npv"])),
            ("ROC AUC", f"{_f(r['auc'])} ({r['score']})")]


def render_markdown(m: dict, context: dict) -> str:
    explain = {k: v.format(resamples=m["bootstrap"]["resamples"], seed=m["bootstrap"]["seed"]) for k, v in EXPLAIN.items()}
    out = ["# Diabetic-retinopathy grading: evaluation report", ""]
    out += [f"> - **{label}: {value}**: {meaning}" for label, value, meaning in headline(m)]
    out += ["", "## What was evaluated", ""]
    out += [f"- **{k}:** {v}" for k, v in context_lines(context)] or ["- predictions.parquet"]
    out += ["", "## Agreement with the graders", "", explain["qwk"], "", f"{explain['accuracy']} {explain['kappa']}", "",
            "| | this model | seed baseline |", "|---|---|---|"]
    out += [f"| {a} | {b} | {c} |" for a, b, c in comparison_rows(m)]
    out += ["", f"QWK 95% interval: {m['qwk_ci95'][0]:.3f} to {m['qwk_ci95'][1]:.3f}.", "",
            "## Referable diabetic retinopathy (grade >= 2)", "", explain["referable"], "", "| | |", "|---|---|"]
    out += [f"| {a} | {b} |" for a, b in referable_rows(m)]
    out += ["", f"![ROC curve]({FIGURES['roc']})", "", "## Per grade", "", explain["per_grade"], "",
            "| grade | images | predicted | precision | recall |", "|---|---|---|---|---|"]
    out += ["| " + " | ".join(row) + " |" for row in grade_rows(m)]
    out += ["", f"![Confusion matrix]({FIGURES['confusion']})", "", f"![Images per grade]({FIGURES['grades']})", "",
            "## Caveats", ""]
    out += [f"- {c}" for c in caveats(m, context)]
    out += ["", f"_Generated {m['created']} by aptos_ray.report; numbers in metrics.json._", ""]
    return "\n".join(out)


CSS = """
body { font-family: -apple-system, Segoe UI, Helvetica, Arial, sans-serif; max-width: 60rem; margin: 2rem auto;
       padding: 0 1rem; color: #1d2530; line-height: 1.5 }
h1 { font-size: 1.6rem; margin-bottom: .2rem }
h2 { font-size: 1.2rem; margin-top: 2rem; border-bottom: 1px solid #dde3ea; padding-bottom: .2rem }
.headline { display: grid; grid-template-columns: repeat(auto-fit, minmax(11rem, 1fr)); gap: .8rem;
            background: #f2f6fa; border: 1px solid #c9d6e3; border-radius: 8px; padding: 1rem; margin: 1rem 0 }
.headline > div { background: #fff; border-radius: 6px; padding: .6rem .8rem; border: 1px solid #e1e8ef }
.headline .label { font-size: .8rem; color: #4a5a6a; text-transform: uppercase; letter-spacing: .03em }
.headline .value { font-size: 1.15rem; font-weight: 600; margin: .2rem 0 }
.headline .meaning { font-size: .8rem; color: #4a5a6a }
table { border-collapse: collapse; margin: .6rem 0 }
td, th { border: 1px solid #dde3ea; padding: .3rem .7rem; text-align: left }
th { background: #f2f6fa }
.figs { display: flex; flex-wrap: wrap; gap: 1rem }
.figs img { max-width: 100%; height: auto; border: 1px solid #e1e8ef }
.note { color: #4a5a6a; font-size: .9rem }
.muted { color: #7a8896; font-size: .8rem }
"""


def _table(header: list[str] | None, rows) -> str:
    e = html.escape
    head = "<tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table>{head}{body}</table>"


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def render_html(m: dict, context: dict, figs: dict[str, bytes]) -> str:
    e = html.escape
    explain = {k: v.format(resamples=m["bootstrap"]["resamples"], seed=m["bootstrap"]["seed"]) for k, v in EXPLAIN.items()}
    box = "".join(f'<div><div class="label">{e(label)}</div><div class="value">{e(value)}</div>'
                  f'<div class="meaning">{e(meaning)}</div></div>' for label, value, meaning in headline(m))
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<title>DR grading evaluation report</title>", f"<style>{CSS}</style></head><body>",
        "<h1>Diabetic-retinopathy grading: evaluation report</h1>",
        f"<p class='muted'>APTOS 2019 grading scale 0-4: {e(', '.join(f'{g} {n}' for g, n in enumerate(GRADE_NAMES)))}</p>",
        f"<div class='headline'>{box}</div>",
        "<h2>What was evaluated</h2>", _table(None, context_lines(context) or [("Predictions", "predictions.parquet")]),
        "<h2>Agreement with the graders</h2>", f"<p>{e(explain['qwk'])}</p>",
        f"<p>{e(explain['accuracy'])} {e(explain['kappa'])}</p>",
        _table(["", "this model", "seed baseline"], comparison_rows(m)),
        f"<p class='note'>Seed baseline: {e(m['baseline']['source'])}.</p>",
        "<h2>Referable diabetic retinopathy (grade &ge; 2)</h2>", f"<p>{e(explain['referable'])}</p>",
        _table(None, referable_rows(m)),
        f"<div class='figs'>{_img(figs['roc'], 'ROC curve of the referable score')}</div>",
        "<h2>Per grade</h2>", f"<p>{e(explain['per_grade'])}</p>",
        _table(["grade", "images", "predicted", "precision", "recall"], grade_rows(m)),
        f"<div class='figs'>{_img(figs['confusion'], 'confusion matrix')}{_img(figs['grades'], 'images per grade')}</div>",
        "<h2>Caveats</h2><ul>" + "".join(f"<li>{e(c)}</li>" for c in caveats(m, context)) + "</ul>",
        f"<p class='muted'>Generated {e(m['created'])} by aptos_ray.report. All numbers: metrics.json.</p>",
        "</body></html>",
    ]
    return "\n".join(parts)


# --------------------------------------------------------------------------- files and the job


def write_report(output: str, predictions: pd.DataFrame, context: dict | None = None,
                 resamples: int = RESAMPLES, seed: int = SEED) -> dict:
    """metrics.json, report.md, report.html and the PNG figures in ``output``; returns the metrics."""
    context = context or {}
    metrics = compute_metrics(predictions, resamples, seed)
    figs = figures(metrics)
    for key, name in FIGURES.items():
        storage.write_bytes(storage.join(output, name), figs[key])
    storage.write_text(storage.join(output, "metrics.json"), json.dumps(metrics, indent=2))
    storage.write_text(storage.join(output, "report.md"), render_markdown(metrics, context))
    storage.write_text(storage.join(output, "report.html"), render_html(metrics, context, figs))
    return metrics


def evaluate(cfg: Config) -> dict:
    """The evaluate job: the report of ``<predict.output>/predictions.parquet``."""
    from aptos_ray.predict import read_predictions

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
    return (f"{m['n']} labelled images: QWK {_qwk_text(m)}, accuracy {m['accuracy']:.3f}, "
            f"Cohen kappa {m['cohen_kappa']:.3f}\n"
            f"referable DR (grade >= 2): sensitivity {_pct(r['sensitivity'])}, specificity "
            f"{_pct(r['specificity'])}, AUC {_f(r['auc'])}")
