"""A predict output folder: submission.csv (Kaggle format), predictions.parquet, unreadable.csv,
predict.json, and, with labels, the evaluation report (``infer.report``).
"""

from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from aptos_ray import storage
from aptos_ray.errors import MissingFileError
from aptos_ray.infer.grader import PROB_COLUMNS
from aptos_ray.infer.inputs import Inputs
from aptos_ray.infer.quality import QUALITY_COLUMNS
from aptos_ray.metrics import NUM_GRADES

UNREADABLE_COLUMNS = ["id", "source", "reason"]
PREDICTIONS = "predictions.parquet"  # a file; to a URI output, a folder of parts written by the Ray workers
SHOW_UNREADABLE = 50  # printed lines; the CSV always has all of them
REPORT_FILES = ("metrics.json", "report.md", "report.html")
FIGURES = {"confusion": "confusion_matrix.png", "roc": "roc_referable.png", "grades": "grade_distribution.png"}
QUALITY_SHEET = "quality_flagged.png"  # contact sheet of the ungradable photographs
EXPLAIN_INDEX = "explain/index.csv"  # the Grad-CAM overlays (--predict.explain) and what they show


def split_results(rows: pd.DataFrame, inputs: Inputs) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(predictions in input order, unreadable rows: found on the driver + failed to decode)."""
    if rows.empty:
        rows = pd.DataFrame({"id": [], "reason": []})
    if "id" not in rows:  # raw inputs' rows: their ids and paths are the listing's, at their order
        listed = [inputs.items[i] for i in rows["order"]]
        rows = rows.assign(id=[item["id"] for item in listed], source=[item["source"] for item in listed])
    failed = rows["reason"].astype(str) != ""
    unreadable = pd.concat([pd.DataFrame(inputs.unreadable, columns=UNREADABLE_COLUMNS),
                            rows[failed].reindex(columns=UNREADABLE_COLUMNS).fillna("")], ignore_index=True)
    good = rows[~failed]
    order = ["order"] if "order" in good else ["id"]  # prepared splits have no input order: by id
    return prediction_columns(good.sort_values(order, kind="stable").reset_index(drop=True)), unreadable.astype(str)


def prediction_columns(good: pd.DataFrame) -> pd.DataFrame:
    """The columns of predictions.parquet, typed, from predicted rows (the driver's, or a Ray
    worker's batch when the workers write the parts)."""
    keep = ["id", "grade", "predicted", "score", *[c for c in ("p_referable", "refer", *PROB_COLUMNS) if c in good],
            *[c for c in QUALITY_COLUMNS if c in good], *(["source"] if "source" in good else [])]
    predictions = good[keep].copy()
    predictions["id"] = predictions["id"].astype(str)
    predictions["grade"] = predictions["grade"].astype(np.int64)
    predictions["predicted"] = predictions["predicted"].astype(np.int64)
    if "refer" in predictions:  # the referral operating point of a cross-validated ensemble
        predictions["refer"] = predictions["refer"].astype(bool)
    if "gradable" in predictions:
        predictions["gradable"] = predictions["gradable"].astype(bool)
        predictions["quality_reason"] = predictions["quality_reason"].astype(str)
    return predictions


def write_outputs(output: str, predictions: pd.DataFrame, unreadable: pd.DataFrame, meta: dict,
                  parts_written: bool = False) -> dict:
    """submission.csv, predictions.parquet, unreadable.csv, predict.json; returns the summary.

    ``parts_written``: predictions.parquet is already there, a folder of parts the Ray workers wrote
    (``infer.predict.write_parts``); ``predictions`` then holds the rows without the columns only
    that folder needs.
    """
    if len(predictions) + len(unreadable) != meta["num_inputs"]:  # a bug, never a data problem
        raise RuntimeError(f"predict lost rows: {meta['num_inputs']} inputs != {len(predictions)} predicted "
                           f"+ {len(unreadable)} unreadable")
    # predict.json, written last, marks a complete folder: an older one must not vouch for files
    # half replaced when a full disk stops this run
    remove_stale_report(output, ("predict.json",))
    submission = pd.DataFrame({"id_code": predictions["id"], "diagnosis": predictions["predicted"]})
    storage.write_text(storage.join(output, "submission.csv"), submission.to_csv(index=False))
    if not parts_written:
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pandas(predictions, preserve_index=False), buf)
        storage.write_bytes(storage.join(output, PREDICTIONS), buf.getvalue())
    storage.write_text(storage.join(output, "unreadable.csv"), unreadable.to_csv(index=False))
    remove_stale_report(output)
    summary = {
        **meta,
        "num_predicted": int(len(predictions)),
        "num_unreadable": int(len(unreadable)),
        "num_labelled": int((predictions["grade"] >= 0).sum()),
        "predicted_grade_counts": {str(g): int((predictions["predicted"] == g).sum()) for g in range(NUM_GRADES)},
    }
    if "gradable" in predictions:
        ungradable = predictions.loc[~predictions["gradable"], "quality_reason"]
        summary["num_gradable"] = int(predictions["gradable"].sum())
        summary["ungradable_reasons"] = {str(k): int(v) for k, v in ungradable.value_counts().items()}
    storage.write_text(storage.join(output, "predict.json"), json.dumps(summary, indent=2))
    return summary


def remove_stale_report(output: str, names: tuple[str, ...] = ()) -> None:
    """A report left by an earlier run in the same folder must not pass for this run's."""
    for name in names or (*REPORT_FILES, *FIGURES.values(), QUALITY_SHEET, EXPLAIN_INDEX):
        fs, inner = storage.filesystem(storage.join(output, name))
        if fs.get_file_info(inner).type.name == "File":
            fs.delete_file(inner)


def print_summary(summary: dict, unreadable: pd.DataFrame, output: str) -> None:
    print(f"predicted {summary['num_predicted']} of {summary['num_inputs']} images in {summary['seconds']:.1f}s "
          f"({summary['images_per_s']:.1f} img/s); grades {summary['predicted_grade_counts']}")
    if "num_gradable" in summary:
        reasons = ", ".join(f"{r}: {n}" for r, n in summary["ungradable_reasons"].items())
        print(f"image quality: {summary['num_gradable']} gradable, {summary['num_predicted'] - summary['num_gradable']} "
              f"ungradable{f' ({reasons})' if reasons else ''}; the column 'gradable' in predictions.parquet")
    if len(unreadable):
        print(f"{len(unreadable)} unreadable inputs (not predicted, listed in {storage.join(output, 'unreadable.csv')}):")
        for row in unreadable.head(SHOW_UNREADABLE).itertuples():
            print(f"  {row.id}: {row.reason}")
        if len(unreadable) > SHOW_UNREADABLE:
            print(f"  ... and {len(unreadable) - SHOW_UNREADABLE} more")
    print(f"wrote {storage.join(output, 'submission.csv')} and predictions.parquet")


def read_predictions(output: str) -> pd.DataFrame:
    """``predictions.parquet`` of a predict output folder: one file (rows in input order), or the
    folder of parts the workers wrote to a URI output (rows in no order there: sorted by id, as
    predict's own report read them)."""
    path = storage.join(output, PREDICTIONS)
    try:
        if storage.file_type(path) == "Directory":
            fs, inner = storage.filesystem(path)
            return by_id(pq.read_table(inner, filesystem=fs).to_pandas())
        with storage.open_input(path) as f:
            return pq.read_table(pa.BufferReader(f.read())).to_pandas()
    except FileNotFoundError:
        raise MissingFileError(
            f"{path}: not found; run `python jobs/predict.py --predict.output={output} ...` first"
        ) from None


def by_id(predictions: pd.DataFrame) -> pd.DataFrame:
    """Rows sorted by id (stable): the one order a folder of parts, written in no order, can be read in."""
    return predictions.sort_values("id", kind="stable").reset_index(drop=True)
