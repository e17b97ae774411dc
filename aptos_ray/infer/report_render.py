"""Rendering of the evaluation report (``infer.report``): figures, report.md and a self-contained
report.html whose figures are embedded as base64 PNG, so it opens anywhere without other files.
"""

from __future__ import annotations

import base64
import html

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from aptos_ray import plots  # noqa: E402
from aptos_ray.data.format import GRADE_NAMES  # noqa: E402
from aptos_ray.infer.outputs import FIGURES, QUALITY_SHEET  # noqa: E402
from aptos_ray.metrics import NUM_GRADES  # noqa: E402

# --------------------------------------------------------------------------- figures


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
    referral = referable.get("referral") or {}
    if referral.get("sensitivity") is not None and referral.get("specificity") is not None:
        ax.plot(1 - referral["specificity"], referral["sensitivity"], "s", ms=8, color="darkgreen",
                label=f"referral point ({referral['operating_point']})")
    ax.set(xlabel="1 - specificity (false-positive rate)", ylabel="sensitivity (true-positive rate)",
           title="Referable DR (grade >= 2)", xlim=(-0.02, 1.02), ylim=(-0.02, 1.02))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=7)
    return plots.png_bytes(fig)


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
    return plots.png_bytes(fig)


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
    q = m.get("quality")
    if q and q["num_ungradable"]:
        notes.append(f"{q['num_ungradable']} photograph(s) judged ungradable ({_reasons_text(q)}) are in the "
                     f"headline numbers; the Image quality section gives the numbers without them.")
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
        lines.append(("Cut-points", ", ".join(f"{c:.3f}" for c in context["cut_points"])
                      + (f" ({context['cut_rule']})" if context.get("cut_rule") else "")))
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


GRADE_HEADER = ["grade", "true count", "predicted count", "predicted / true", "precision", "recall"]
MISCALLED = 1.5  # a grade predicted this many times more (or less) often than it occurs is flagged


def grade_rows(m: dict) -> list[tuple[str, ...]]:
    return [(f"{g['grade']} {g['name']}", str(g["support"]), str(g["predicted"]),
             f"{g['predicted'] / g['support']:.2f}" if g["support"] else "-", _f(g["precision"]), _f(g["recall"]))
            for g in m["per_grade"]]


def decision_text(m: dict, context: dict) -> str:
    """How the grades were decided, and which grades are called far more or less often than they occur."""
    made = f", chosen by {context['cut_rule']}" if context.get("cut_rule") else ""
    if context.get("cut_points"):
        text = f"Predicted grades: the grade score cut at {', '.join(f'{c:.3f}' for c in context['cut_points'])}{made}."
    else:
        text = f"Predicted grades: {context.get('cut_rule') or 'as the model decoded them'}."
    flagged = [f"grade {g['grade']} predicted {g['predicted']} times for {g['support']}" for g in m["per_grade"]
               if g["support"] and not 1 / MISCALLED <= g["predicted"] / g["support"] <= MISCALLED]
    if flagged:
        text += f" Predicted more than {MISCALLED}x or less than 1/{MISCALLED} as often as it occurs: {'; '.join(flagged)}."
    return text


def referable_rows(m: dict) -> list[tuple[str, str]]:
    r = m["referable"]
    return [("Sensitivity", f"{_pct(r['sensitivity'], r['sensitivity_ci95'])}, {r['tp']} of {r['positives']}"),
            ("Specificity", f"{_pct(r['specificity'], r['specificity_ci95'])}, {r['tn']} of {r['negatives']}"),
            ("Positive predictive value", _pct(r["ppv"])),
            ("Negative predictive value", _pct(r["npv"])),
            ("ROC AUC", f"{_f(r['auc'])} ({r['score']})"), *referral_rows(r.get("referral"))]


def referral_rows(x: dict | None) -> list[tuple[str, str]]:
    """The referral operating point (a threshold on the score chosen on out-of-fold predictions)."""
    if not x:
        return []
    target = f", chosen for sensitivity >= {x['target_sensitivity']:.2f}" if x.get("target_sensitivity") else ""
    return [(f"Referral point ({x['operating_point']}{target}): sensitivity",
             f"{_pct(x['sensitivity'], x['sensitivity_ci95'])}, {x['tp']} of {x['tp'] + x['fn']}"),
            ("Referral point: specificity", f"{_pct(x['specificity'], x['specificity_ci95'])}, "
             f"{x['tn']} of {x['tn'] + x['fp']}")]


# --------------------------------------------------------------------------- screening: quality and heatmaps

MAX_LISTED = 200  # ungradable rows listed in the report; metrics.json has all of them
EXPLAIN_TEXT = ("Grad-CAM heatmaps: red where the model's last feature maps pushed its output up (the grade "
                "score of a regression head, the predicted grade of a classification head), blue where they did "
                "not. Same model and preprocessing as the prediction, one view (no test-time augmentation). "
                "Groups: most confident referable, most uncertain (nearest a grade boundary), and the largest "
                "misses against the graders. A heatmap is coarse (one cell per 32 input pixels) and shows "
                "where the evidence was, not what it was.")
QUALITY_TEXT = ("Every photograph gets a quality verdict from measured statistics (exposure, sharpness as the "
                "variance of the Laplacian, the visible share and size of the fundus disc; thresholds in "
                "aptos_ray/infer/quality.py, measured in benchmarks/RESULTS.md). An ungradable photograph "
                "still gets a grade, but a screening programme would ask for a new photograph rather than act "
                "on it: the metrics on gradable photographs are the ones that describe the grader in use.")


def comparison_by_quality(m: dict) -> list[tuple[str, str, str]]:
    """(metric, all images, gradable only) rows."""
    g = m["quality"]["gradable_metrics"]

    def cells(x: dict | None) -> list[str]:
        if x is None:
            return ["n/a"] * 7
        r = x["referable"]
        return [str(x["n"]), _qwk_text(x), _f(x["accuracy"]), _f(x["cohen_kappa"]), _pct(r["sensitivity"]),
                _pct(r["specificity"]), _f(r["auc"])]

    names = ["Labelled images", "Quadratic weighted kappa", "Accuracy", "Cohen kappa", "Referable sensitivity",
             "Referable specificity", "Referable ROC AUC"]
    return list(zip(names, cells(m), cells(g)))


def _reasons_text(q: dict) -> str:
    return ", ".join(f"{r}: {n}" for r, n in q["reasons"].items()) or "none"


def quality_markdown(m: dict, screening: dict) -> list[str]:
    q = m.get("quality")
    if q is None:
        return []
    out = ["## Image quality", "", QUALITY_TEXT, "",
           f"Gradable: {q['num_gradable']}; ungradable: {q['num_ungradable']} ({_reasons_text(q)}).", ""]
    if q["gradable_metrics"] is not None and q["num_ungradable"]:
        out += ["| | all images | gradable only |", "|---|---|---|"]
        out += [f"| {a} | {b} | {c} |" for a, b, c in comparison_by_quality(m)] + [""]
    if q["num_ungradable"]:
        out += ["| id | reason | true grade | predicted |", "|---|---|---|---|"]
        out += [f"| {r['id']} | {r['quality_reason']} | {r['grade'] if r['grade'] >= 0 else '-'} | {r['predicted']} |"
                for r in q["ungradable"][:MAX_LISTED]]
        out += [""] + ([f"![Ungradable photographs]({QUALITY_SHEET})", ""] if "sheet" in screening else [])
    return out


def explain_markdown(index: pd.DataFrame | None) -> list[str]:
    if index is None or index.empty:
        return []
    out = ["## Where the model looked", "", EXPLAIN_TEXT, ""]
    for grade, rows in _by_grade(index):
        out += [f"### {grade}", ""]
        out += [f"![{r.group} {r.id}: grade {_grade(r.grade)}, predicted {r.predicted}]({r.file})" for r in rows.itertuples()]
        out += [""]
    return out


def _grade(g: int) -> str:
    return str(g) if g >= 0 else "unknown"


def _by_grade(index: pd.DataFrame):
    """Groups of overlays per grade: the graders' grade when known, else the predicted one."""
    key = np.where(index["grade"] >= 0, index["grade"], index["predicted"])
    for g in sorted(set(key.tolist())):
        label = "true grade" if (index["grade"][key == g] >= 0).all() else "grade"
        yield f"{label} {g} ({GRADE_NAMES[g]})", index[key == g]


def quality_html(m: dict, screening: dict) -> str:
    q = m.get("quality")
    if q is None:
        return ""
    e = html.escape
    parts = ["<h2>Image quality</h2>", f"<p>{e(QUALITY_TEXT)}</p>",
             f"<p><b>Gradable: {q['num_gradable']}</b>; ungradable: {q['num_ungradable']} ({e(_reasons_text(q))}).</p>"]
    if q["gradable_metrics"] is not None and q["num_ungradable"]:
        parts.append(_table(["", "all images", "gradable only"], comparison_by_quality(m)))
    if q["num_ungradable"]:
        rows = [(r["id"], r["quality_reason"], _grade(r["grade"]), r["predicted"]) for r in q["ungradable"][:MAX_LISTED]]
        parts.append(_table(["id", "reason", "true grade", "predicted"], rows))
        if q["num_ungradable"] > MAX_LISTED:
            parts.append(f"<p class='muted'>First {MAX_LISTED} of {q['num_ungradable']}; all in metrics.json and "
                         f"predictions.parquet.</p>")
        if "sheet" in screening:
            parts.append(f"<div class='figs'>{_img(screening['sheet'], 'ungradable photographs')}</div>")
    return "\n".join(parts)


def explain_html(index: pd.DataFrame | None) -> str:
    if index is None or index.empty:
        return ""
    e = html.escape
    parts = ["<h2>Where the model looked</h2>", f"<p>{e(EXPLAIN_TEXT)}</p>"]
    for grade, rows in _by_grade(index):
        tiles = "".join(f"<figure>{_img(r.png, f'Grad-CAM {r.id}')}<figcaption>{e(str(r.id))}<br>"
                        f"{e(r.group.replace('_', ' '))}: true {e(_grade(r.grade))}, predicted {r.predicted}"
                        f"{'' if r.gradable else ' (ungradable)'}</figcaption></figure>" for r in rows.itertuples())
        parts += [f"<h3>{e(grade)}</h3>", f"<div class='tiles'>{tiles}</div>"]
    return "\n".join(parts)


def render_markdown(m: dict, context: dict, screening: dict | None = None) -> str:
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
            decision_text(m, context), "", "| " + " | ".join(GRADE_HEADER) + " |", "|---|---|---|---|---|---|"]
    out += ["| " + " | ".join(row) + " |" for row in grade_rows(m)]
    out += ["", f"![Confusion matrix]({FIGURES['confusion']})", "", f"![Images per grade]({FIGURES['grades']})", ""]
    out += quality_markdown(m, screening or {}) + explain_markdown((screening or {}).get("explain"))
    out += ["## Caveats", ""]
    out += [f"- {c}" for c in caveats(m, context)]
    out += ["", f"_Generated {m['created']} by aptos_ray.infer.report; numbers in metrics.json._", ""]
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
.tiles { display: flex; flex-wrap: wrap; gap: .5rem }
.tiles figure { margin: 0; width: 10rem; font-size: .7rem; color: #4a5a6a }
.tiles img { width: 10rem; height: auto; border: 1px solid #e1e8ef }
"""


def _table(header: list[str] | None, rows) -> str:
    e = html.escape
    head = "<tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table>{head}{body}</table>"


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def render_html(m: dict, context: dict, figs: dict[str, bytes], screening: dict | None = None) -> str:
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
        f"<p>{e(decision_text(m, context))}</p>", _table(GRADE_HEADER, grade_rows(m)),
        f"<div class='figs'>{_img(figs['confusion'], 'confusion matrix')}{_img(figs['grades'], 'images per grade')}</div>",
        quality_html(m, screening or {}),
        explain_html((screening or {}).get("explain")),
        "<h2>Caveats</h2><ul>" + "".join(f"<li>{e(c)}</li>" for c in caveats(m, context)) + "</ul>",
        f"<p class='muted'>Generated {e(m['created'])} by aptos_ray.infer.report. All numbers: metrics.json.</p>",
        "</body></html>",
    ]
    return "\n".join(parts)


