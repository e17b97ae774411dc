"""A cross-validation's results: out-of-fold predictions, cut-points and the referral operating point
chosen on them, per-fold and pooled metrics, and the files ``cv.json``, ``oof.parquet``, ``cv.md``.

Every image is predicted once, by the model of the fold that did not train on it. Two sets of
decisions are made on those scores:
- the *deployed* ones (``cv.json``: what predict applies to the ensemble of the fold models): QWK
  cut-points optimised on all out-of-fold scores, and the referral threshold on the continuous score
  reaching ``cv.target_sensitivity`` for referable DR on them, with a logistic calibration of
  P(referable | score);
- the *scored* ones: fold k is graded with cut-points and a threshold chosen on the other folds'
  out-of-fold scores only (cross-fitting), so no figure in the table was tuned on the images it grades.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from sklearn.metrics import roc_auc_score

from aptos_ray import storage
from aptos_ray.config import Config
from aptos_ray.data.folds import fold_ids, pooled_rows
from aptos_ray.data.format import TRAIN_COLUMNS, decode_batch, read_manifest, table_batches
from aptos_ray.cut_rules import MIN_PRECISION, choose_cut_points
from aptos_ray.metrics import (
    NUM_GRADES,
    REFERABLE_GRADE,
    apply_cut_points,
    grading_metrics,
    referable_calibration,
    referral_rates,
    referral_threshold,
)

CV_FILE = "cv.json"
OOF_FILE = "oof.parquet"
TABLE_FILE = "cv.md"
METRICS = ("qwk", "acc", "kappa", "sens_grade", "spec_grade", "sens_refer", "spec_refer", "auc")


def fold_name(fold: int) -> str:
    return f"fold_{fold}"


# --- out-of-fold predictions ------------------------------------------------------------------


def oof_predictions(cfg: Config, checkpoints: dict[int, str], batch_size: int = 64) -> pd.DataFrame:
    """``id, grade, fold, score`` (+ ``prob_0..4`` for heads with probabilities) for every image,
    predicted by the checkpoint of its own fold (``checkpoints``: fold -> checkpoint), with
    ``cv.oof_tta`` extra views, on the CPU or this process's GPU."""
    import torch

    from aptos_ray.train.checkpoint import read_checkpoint
    from aptos_ray.infer.grader import PROB_COLUMNS, Grader

    device = "cuda" if torch.cuda.is_available() else "cpu"
    encoding = read_manifest(cfg.data.dataset).get("encoding", "raw")
    parts = []
    for fold, path in sorted(checkpoints.items()):
        grader = Grader(read_checkpoint(path), device, cfg.cv.oof_tta)
        _, val_ids = fold_ids(cfg.data.dataset, cfg.data.folds, fold, cfg.data.fold_seed)
        table = pooled_rows(cfg.data.dataset, TRAIN_COLUMNS, val_ids)
        ids, grades, outputs = [], [], []
        for batch in table_batches(table, batch_size):
            outputs.append(grader.outputs(decode_batch(batch, encoding)))
            ids.extend(str(i) for i in batch["id"])
            grades.append(np.asarray(batch["grade"], dtype=np.int64))
        out = torch.cat(outputs)
        part = pd.DataFrame({"id": ids, "grade": np.concatenate(grades), "fold": fold,
                             "score": grader.head.scores(out).numpy().astype(np.float64)})
        probs = grader.head.probabilities(out)
        if probs is not None:
            for g, column in enumerate(PROB_COLUMNS):
                part[column] = probs[:, g].numpy().astype(np.float64)
        parts.append(part)
    return pd.concat(parts, ignore_index=True).sort_values("id", kind="stable").reset_index(drop=True)


# --- decisions on out-of-fold scores ------------------------------------------------------------


def decisions(scores: np.ndarray, grades: np.ndarray, target_sensitivity: float, cut_rule: str = "qwk",
              min_precision: float = MIN_PRECISION) -> dict:
    """Cut-points by ``cut_rule``, the referral threshold for the target sensitivity and P(referable | score)."""
    threshold = referral_threshold(scores, grades, target_sensitivity)
    return {
        "cut_points": choose_cut_points(scores, grades, cut_rule, min_precision),
        "cut_rule": cut_rule,
        "referral": {
            "threshold": threshold,
            "target_sensitivity": target_sensitivity,
            "calibration": referable_calibration(scores, grades),
            "definition": f"refer when the continuous grade score >= threshold (true grade >= {REFERABLE_GRADE})",
            **({k: v for k, v in referral_rates(scores, grades, threshold).items() if k != "threshold"}
               if threshold is not None else {}),
        },
    }


def cross_fitted(oof: pd.DataFrame, target_sensitivity: float, cut_rule: str = "qwk",
                 min_precision: float = MIN_PRECISION) -> pd.DataFrame:
    """``oof`` plus ``predicted`` and ``refer`` for each fold from the decisions fitted on the others."""
    out = oof.copy()
    out["predicted"], out["refer"] = -1, False
    for fold in sorted(out["fold"].unique()):
        mine, others = out["fold"] == fold, out["fold"] != fold
        fitted = decisions(out.loc[others, "score"].to_numpy(), out.loc[others, "grade"].to_numpy(),
                           target_sensitivity, cut_rule, min_precision)
        scores = out.loc[mine, "score"].to_numpy()
        out.loc[mine, "predicted"] = apply_cut_points(scores, fitted["cut_points"])
        threshold = fitted["referral"]["threshold"]
        out.loc[mine, "refer"] = scores >= threshold if threshold is not None else False
    out["predicted"] = out["predicted"].astype(np.int64)
    return out


def scores_of(rows: pd.DataFrame) -> dict:
    """QWK, accuracy, kappa, and referable-DR sensitivity/specificity at the grade-based operating
    point (predicted grade >= 2) and at the referral threshold (``refer``), AUC of the score."""
    grades, predicted = rows["grade"].to_numpy(), rows["predicted"].to_numpy()
    base = grading_metrics(grades, predicted)
    truth = grades >= REFERABLE_GRADE
    by_grade, refer = predicted >= REFERABLE_GRADE, rows["refer"].to_numpy(dtype=bool)

    def rate(flags: np.ndarray, among: np.ndarray, value: bool) -> float:
        return float((flags[among] == value).mean()) if among.any() else float("nan")

    both = truth.any() and (~truth).any()
    return {"n": int(len(rows)), "qwk": base["qwk"], "acc": base["acc"], "kappa": base["kappa"],
            "sens_grade": rate(by_grade, truth, True), "spec_grade": rate(by_grade, ~truth, False),
            "sens_refer": rate(refer, truth, True), "spec_refer": rate(refer, ~truth, False),
            "auc": float(roc_auc_score(truth, rows["score"])) if both else float("nan"),
            "recall": [round(base[f"recall_{g}"], 3) for g in range(5)],
            "true_counts": np.bincount(grades, minlength=NUM_GRADES).tolist(),
            "predicted_counts": np.bincount(predicted, minlength=NUM_GRADES).tolist()}


def summarise(oof: pd.DataFrame, target_sensitivity: float, fold_seconds: dict[int, float],
              cut_rule: str = "qwk") -> tuple[dict, pd.DataFrame]:
    """Per-fold and pooled cross-fitted figures, mean and spread over folds, and the deployed decisions."""
    scored = cross_fitted(oof, target_sensitivity, cut_rule)
    per_fold = [{"fold": int(k), **scores_of(scored[scored["fold"] == k]),
                 "seconds": round(fold_seconds.get(int(k), float("nan")), 1)}
                for k in sorted(scored["fold"].unique())]
    spread = {m: {"mean": float(np.nanmean([f[m] for f in per_fold])),
                  "std": float(np.nanstd([f[m] for f in per_fold]))} for m in (*METRICS, "seconds")}
    return {"per_fold": per_fold, "mean_std": spread, "pooled": scores_of(scored),
            **decisions(oof["score"].to_numpy(), oof["grade"].to_numpy(), target_sensitivity, cut_rule)}, scored


# --- files ---------------------------------------------------------------------------------------


def write_results(cv_dir: str, summary: dict, scored: pd.DataFrame) -> None:
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(scored, preserve_index=False), buf)
    storage.write_bytes(storage.join(cv_dir, OOF_FILE), buf.getvalue())
    storage.write_text(storage.join(cv_dir, CV_FILE), json.dumps(summary, indent=2))
    storage.write_text(storage.join(cv_dir, TABLE_FILE), markdown(summary) + "\n")


def _cell(value: float, digits: int = 3) -> str:
    return "-" if value is None or value != value else f"{value:.{digits}f}"


def markdown(summary: dict, label: str = "") -> str:
    """The cross-validation table: one row per fold, mean +- std over folds, pooled out-of-fold."""
    head = ("| {0}fold | n | QWK | acc | kappa | sens / spec (grade >= 2) | sens / spec (referral) | AUC | s |"
            .format("recipe | " if label else ""))
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    prefix = f"{label} | " if label else ""
    for f in summary["per_fold"]:
        lines.append(f"| {prefix}{f['fold']} | {f['n']} | {_cell(f['qwk'])} | {_cell(f['acc'])} | "
                     f"{_cell(f['kappa'])} | {_cell(f['sens_grade'])} / {_cell(f['spec_grade'])} | "
                     f"{_cell(f['sens_refer'])} / {_cell(f['spec_refer'])} | {_cell(f['auc'])} | "
                     f"{_cell(f['seconds'], 0)} |")
    m = summary["mean_std"]

    def ms(key: str, digits: int = 3) -> str:
        return f"{_cell(m[key]['mean'], digits)} ± {_cell(m[key]['std'], digits)}"

    lines.append(f"| {prefix}mean ± sd | | {ms('qwk')} | {ms('acc')} | {ms('kappa')} | {ms('sens_grade')} / "
                 f"{ms('spec_grade')} | {ms('sens_refer')} / {ms('spec_refer')} | {ms('auc')} | {ms('seconds', 0)} |")
    p = summary["pooled"]
    lines.append(f"| {prefix}pooled OOF | {p['n']} | {_cell(p['qwk'])} | {_cell(p['acc'])} | {_cell(p['kappa'])} | "
                 f"{_cell(p['sens_grade'])} / {_cell(p['spec_grade'])} | {_cell(p['sens_refer'])} / "
                 f"{_cell(p['spec_refer'])} | {_cell(p['auc'])} | |")
    if "predicted_counts" in p:  # cross-validations before cv.cut_rule did not count
        lines.append(f"\nPooled out-of-fold count per grade 0-4, predicted (cv.cut_rule={summary.get('cut_rule', 'qwk')}) "
                     f"/ true: {' / '.join(map(str, p['predicted_counts']))} for {' / '.join(map(str, p['true_counts']))}")
    return "\n".join(lines)
