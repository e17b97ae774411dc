"""The evaluation report as one model, rendered twice: report.md, and a self-contained report.html
(the jinja2 template ``templates/report.html.j2``) whose figures are embedded as base64 PNG, so it
opens anywhere without other files.

``build_report`` decides everything the report says (from ``infer.report``'s metrics, predict's
context and the screening files) into a ``Report``: a headline, then sections of blocks (text,
tables, pictures, bullet lists). ``to_markdown`` and ``to_html`` only lay the blocks out.
"""

from __future__ import annotations

import base64
import functools
from dataclasses import dataclass, field
from typing import ClassVar

import jinja2
import numpy as np
import pandas as pd

from aptos_ray.data.format import GRADE_NAMES
from aptos_ray.infer.outputs import FIGURES, QUALITY_SHEET
from aptos_ray.metrics import NUM_GRADES

# --------------------------------------------------------------------------- the model


@dataclass
class Text:
    text: str
    style: str = ""  # "note" or "muted": smaller print in the HTML
    kind: ClassVar[str] = "text"


@dataclass
class Bullets:
    items: list[str]
    kind: ClassVar[str] = "bullets"


@dataclass
class Table:
    header: list[str] | None  # None: a table of (label, value) rows
    rows: list[tuple]
    kind: ClassVar[str] = "table"


@dataclass
class Picture:
    file: str  # beside report.md, which links it
    alt: str
    png: bytes  # what report.html embeds


@dataclass
class Pictures:
    items: list[Picture]
    tiles: bool = False  # small and captioned with their alt text (the Grad-CAM overlays)
    kind: ClassVar[str] = "pictures"


@dataclass
class Section:
    title: str
    blocks: list = field(default_factory=list)  # Text | Bullets | Table | Pictures
    level: int = 2  # 3: a subsection of the one before


@dataclass
class Report:
    headline: list[tuple[str, str, str]]  # (label, value, one-line meaning)
    sections: list[Section]
    footer: str
    title: str = "Diabetic-retinopathy grading: evaluation report"
    scale: str = "APTOS 2019 grading scale 0-4: " + ", ".join(f"{g} {n}" for g, n in enumerate(GRADE_NAMES))


def build_report(m: dict, context: dict, figures: dict[str, bytes], screening: dict | None = None) -> Report:
    """The report of metrics ``m`` (``infer.report.compute_metrics``), predict's ``context``, the
    figures' PNG bytes by ``FIGURES`` key, and the screening files predict wrote, when there."""
    screening = screening or {}
    explain = {k: v.format(resamples=m["bootstrap"]["resamples"], seed=m["bootstrap"]["seed"]) for k, v in EXPLAIN.items()}

    def picture(key: str, alt: str) -> Picture:
        return Picture(FIGURES[key], alt, figures[key])

    sections = [
        Section("What was evaluated", [Table(None, context_lines(context) or [("Predictions", "predictions.parquet")])]),
        Section("Agreement with the graders", [
            Text(explain["qwk"]), Text(f"{explain['accuracy']} {explain['kappa']}"),
            Table(["", "this model", "seed baseline"], comparison_rows(m)),
            Text(f"QWK 95% interval: {m['qwk_ci95'][0]:.3f} to {m['qwk_ci95'][1]:.3f}."),
            Text(f"Seed baseline: {m['baseline']['source']}.", "note")]),
        Section("Referable diabetic retinopathy (grade >= 2)", [
            Text(explain["referable"]), Table(None, referable_rows(m)),
            Pictures([picture("roc", "ROC curve of the referable score")])]),
        Section("Per grade", [
            Text(explain["per_grade"]), Text(decision_text(m, context)), Table(GRADE_HEADER, grade_rows(m)),
            Pictures([picture("confusion", "Confusion matrix"), picture("grades", "Images per grade")])]),
        *quality_section(m, screening), *explain_section(screening.get("explain")),
        Section("Caveats", [Bullets(caveats(m, context))]),
    ]
    return Report(headline(m), sections, f"Generated {m['created']} by aptos_ray.infer.report; all numbers in metrics.json.")


# --------------------------------------------------------------------------- what it says


def fmt(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def pct(value, ci=None) -> str:
    if value is None:
        return "n/a"
    text = f"{100 * value:.1f}%"
    return f"{text} (95% CI {100 * ci[0]:.1f}-{100 * ci[1]:.1f}%)" if ci else text


def qwk_text(m: dict) -> str:
    return f"{m['qwk']:.3f} (95% CI {m['qwk_ci95'][0]:.3f} to {m['qwk_ci95'][1]:.3f})"


def headline(m: dict) -> list[tuple[str, str, str]]:
    """(label, value, one-line meaning) for the box at the top."""
    r = m["referable"]
    return [
        ("Quadratic weighted kappa", qwk_text(m),
         "agreement with the graders on the 0-4 scale; 1 = perfect, 0 = chance (competition metric)"),
        ("Referable DR sensitivity", pct(r["sensitivity"], r["sensitivity_ci95"]),
         f"of {r['positives']} images with grade >= 2, the share the model flags for referral"),
        ("Referable DR specificity", pct(r["specificity"], r["specificity_ci95"]),
         f"of {r['negatives']} images with grade 0-1, the share the model correctly does not refer"),
        ("ROC AUC (referable)", fmt(r["auc"]), f"how well {r['score']} ranks referable above non-referable images"),
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
    return [("Accuracy", fmt(m["accuracy"]), fmt(b["accuracy"])),
            ("Cohen kappa", fmt(m["cohen_kappa"]), fmt(b["cohen_kappa"])),
            ("Quadratic weighted kappa", fmt(m["qwk"]), "not reported"),
            ("Images", str(m["n"]), str(b["n"]))]


GRADE_HEADER = ["grade", "true count", "predicted count", "predicted / true", "precision", "recall"]
MISCALLED = 1.5  # a grade predicted this many times more (or less) often than it occurs is flagged


def grade_rows(m: dict) -> list[tuple[str, ...]]:
    return [(f"{g['grade']} {g['name']}", str(g["support"]), str(g["predicted"]),
             f"{g['predicted'] / g['support']:.2f}" if g["support"] else "-", fmt(g["precision"]), fmt(g["recall"]))
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
    return [("Sensitivity", f"{pct(r['sensitivity'], r['sensitivity_ci95'])}, {r['tp']} of {r['positives']}"),
            ("Specificity", f"{pct(r['specificity'], r['specificity_ci95'])}, {r['tn']} of {r['negatives']}"),
            ("Positive predictive value", pct(r["ppv"])),
            ("Negative predictive value", pct(r["npv"])),
            ("ROC AUC", f"{fmt(r['auc'])} ({r['score']})"), *referral_rows(r.get("referral"))]


def referral_rows(x: dict | None) -> list[tuple[str, str]]:
    """The referral operating point (a threshold on the score chosen on out-of-fold predictions)."""
    if not x:
        return []
    target = f", chosen for sensitivity >= {x['target_sensitivity']:.2f}" if x.get("target_sensitivity") else ""
    return [(f"Referral point ({x['operating_point']}{target}): sensitivity",
             f"{pct(x['sensitivity'], x['sensitivity_ci95'])}, {x['tp']} of {x['tp'] + x['fn']}"),
            ("Referral point: specificity", f"{pct(x['specificity'], x['specificity_ci95'])}, "
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
        return [str(x["n"]), qwk_text(x), fmt(x["accuracy"]), fmt(x["cohen_kappa"]), pct(r["sensitivity"]),
                pct(r["specificity"]), fmt(r["auc"])]

    names = ["Labelled images", "Quadratic weighted kappa", "Accuracy", "Cohen kappa", "Referable sensitivity",
             "Referable specificity", "Referable ROC AUC"]
    return list(zip(names, cells(m), cells(g)))


def _reasons_text(q: dict) -> str:
    return ", ".join(f"{r}: {n}" for r, n in q["reasons"].items()) or "none"


def quality_section(m: dict, screening: dict) -> list[Section]:
    q = m.get("quality")
    if q is None:
        return []
    blocks = [Text(QUALITY_TEXT), Text(f"Gradable: {q['num_gradable']}; ungradable: {q['num_ungradable']} "
                                       f"({_reasons_text(q)}).")]
    if q["gradable_metrics"] is not None and q["num_ungradable"]:
        blocks.append(Table(["", "all images", "gradable only"], comparison_by_quality(m)))
    if q["num_ungradable"]:
        blocks.append(Table(["id", "reason", "true grade", "predicted"],
                            [(r["id"], r["quality_reason"], _grade(r["grade"]), r["predicted"])
                             for r in q["ungradable"][:MAX_LISTED]]))
        if q["num_ungradable"] > MAX_LISTED:
            blocks.append(Text(f"First {MAX_LISTED} of {q['num_ungradable']}; all in metrics.json and "
                               f"predictions.parquet.", "muted"))
        if "sheet" in screening:
            blocks.append(Pictures([Picture(QUALITY_SHEET, "Ungradable photographs", screening["sheet"])]))
    return [Section("Image quality", blocks)]


def explain_section(index: pd.DataFrame | None) -> list[Section]:
    """The Grad-CAM overlays (``explain/index.csv`` with each file's bytes in a ``png`` column)."""
    if index is None or index.empty:
        return []
    sections = [Section("Where the model looked", [Text(EXPLAIN_TEXT)])]
    for grade, rows in _by_grade(index):
        tiles = [Picture(r.file, f"{r.id}: {r.group.replace('_', ' ')}, true {_grade(r.grade)}, predicted "
                                 f"{r.predicted}{'' if r.gradable else ' (ungradable)'}", r.png) for r in rows.itertuples()]
        sections.append(Section(grade, [Pictures(tiles, tiles=True)], level=3))
    return sections


def _grade(g: int) -> str:
    return str(g) if g >= 0 else "unknown"


def _by_grade(index: pd.DataFrame):
    """Groups of overlays per grade: the graders' grade when known, else the predicted one."""
    key = np.where(index["grade"] >= 0, index["grade"], index["predicted"])
    for g in sorted(set(key.tolist())):
        label = "true grade" if (index["grade"][key == g] >= 0).all() else "grade"
        yield f"{label} {g} ({GRADE_NAMES[g]})", index[key == g]


# --------------------------------------------------------------------------- the two renderings


def to_markdown(report: Report) -> str:
    out = [f"# {report.title}", "", f"_{report.scale}_", ""]
    out += [f"> - **{label}: {value}**: {meaning}" for label, value, meaning in report.headline] + [""]
    for section in report.sections:
        out += [f"{'#' * section.level} {section.title}", ""]
        for block in section.blocks:
            out += _markdown(block) + [""]
    return "\n".join([*out, f"_{report.footer}_", ""])


def _markdown(block) -> list[str]:
    if isinstance(block, Table):
        header = block.header or ["", ""]
        return [_markdown_row(header), "|" + "---|" * len(header), *(_markdown_row(row) for row in block.rows)]
    if isinstance(block, Pictures):
        return ["![" + p.alt.replace("]", "\\]") + f"]({p.file})" for p in block.items]
    if isinstance(block, Bullets):
        return [f"- {item}" for item in block.items]
    return [block.text]


def _markdown_row(cells) -> str:
    texts = [str(c).replace("|", "\\|") for c in cells]  # a "|" in a cell (an id, a reason) would end it early
    return "|" + "|".join(f" {t} " if t else " " for t in texts) + "|"


@functools.cache
def _template() -> jinja2.Template:
    env = jinja2.Environment(loader=jinja2.PackageLoader("aptos_ray.infer", "templates"),
                             autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["base64"] = lambda data: base64.b64encode(data).decode()
    return env.get_template("report.html.j2")


def to_html(report: Report) -> str:
    return _template().render(report=report)
