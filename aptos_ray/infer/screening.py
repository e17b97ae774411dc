"""Screening outputs of a prediction run, beside the grades: which photographs are gradable, and
where the model looked.

    quality_of_rows       Ray Data stage for prepared inputs: the quality columns (quality.QUALITY_COLUMNS)
                          of stored images
                          (raw inputs get them in ``predict.load_rows``, from the photograph itself)
    write_quality_sheet   quality_flagged.png: a contact sheet of the ungradable photographs
    write_explain         explain/*.png: Grad-CAM overlays of the chosen images (``--predict.explain=N``)
    screening_outputs     both, for the predict job (``infer.predict``)

The last two read back only the few images they show (a second look at a handful of rows, not a
second pass over the data); the verdicts and grades themselves come from the one Ray Data pass.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import torch

from aptos_ray import figures, storage
from aptos_ray.config import PrepareConfig
from aptos_ray.data.format import decode_batch, decode_image, read_split
from aptos_ray.data.preprocess import preprocess
from aptos_ray.data.sources import read_image
from aptos_ray.train.checkpoint import Checkpoint
from aptos_ray.infer.grader import Grader
from aptos_ray.infer.inputs import Inputs
from aptos_ray.infer.outputs import QUALITY_SHEET
from aptos_ray.infer.quality import as_columns, assess, decode_size, not_assessed

MAX_SHEET = 48  # photographs on the contact sheet; the table in the report lists all


def quality_of_rows(batch: dict, encoding: str, assessable: bool) -> dict:
    """Ray Data stage: QUALITY_COLUMNS for prepared rows (decoded stored images).

    A prepared image was cropped, resized and masked; the verdict reads it as it is, with the
    diameter scaled back by the original photograph's size (``orig_height/orig_width``; an upper
    bound, as the crop is unknown). ``assessable=False`` (normalised images, prepare.normalise: exposure,
    colour or sharpness are changed in them) leaves the rows gradable and the statistics empty.
    """
    qualities = []
    for i, data in enumerate(batch["image"]):
        if not assessable:
            qualities.append(not_assessed(gradable=True))
            continue
        h, w = int(batch["height"][i]), int(batch["width"][i])
        image = decode_image(data, h, w, encoding)
        original = max(int(batch["orig_height"][i]), int(batch["orig_width"][i])) if "orig_height" in batch else 0
        qualities.append(assess(image, scale=original / max(h, w) if original > 0 else 1.0))
    return {**batch, **as_columns(qualities)}


# --------------------------------------------------------------------------- contact sheet


def contact_sheet(images: list[np.ndarray], captions: list[str], columns: int = 6) -> bytes:
    """PNG: the images as thumbnails, ``columns`` to a row, each with its caption (id and reason)."""
    rows = [slice(i, i + columns) for i in range(0, len(images), columns)]
    return figures.png(figures.mosaic([images[r] for r in rows], [captions[r] for r in rows],
                                      "Photographs judged ungradable", tile=160))


def write_quality_sheet(output: str, predictions: pd.DataFrame, load_originals) -> int:
    """quality_flagged.png for the ungradable rows (the first MAX_SHEET); returns how many it shows.

    ``load_originals(rows)`` gives the images as they were assessed (photographs for raw inputs).
    """
    if "gradable" not in predictions:
        return 0
    flagged = predictions[~predictions["gradable"].astype(bool)].head(MAX_SHEET)
    if flagged.empty:
        return 0
    images = load_originals(flagged)
    captions = [f"{row.id}\n{row.quality_reason}" for row in flagged.itertuples()]
    storage.write_bytes(storage.join(output, QUALITY_SHEET), contact_sheet(images, captions))
    return len(flagged)


# --------------------------------------------------------------------------- explanations


def write_explain(output: str, predictions: pd.DataFrame, n: int, grader, load_preprocessed) -> dict:
    """Grad-CAM overlays of the chosen images (explain.select) with ``grader`` (the checkpoint's
    model and transforms); ``load_preprocessed(rows)`` gives the images exactly as predicted."""
    from aptos_ray.infer.explain import GROUPS, Explainer, select, write_explanations

    chosen = select(predictions, n, grader.cut_points)
    if chosen.empty:
        return {"n": n, "images": 0}
    unique = chosen.drop_duplicates("id")
    images = dict(zip(unique["id"], load_preprocessed(unique)))
    batch = np.stack([images[i] for i in chosen["id"]])
    explainer = Explainer(grader)
    heatmaps = np.concatenate([explainer.heatmaps(batch[i : i + 16]) for i in range(0, len(batch), 16)])
    index = write_explanations(output, chosen, batch, heatmaps)
    # The same model on the same pixels must give the same grade as the prediction pass (with TTA
    # the pass averaged more views, so it may differ there).
    regraded = grader(batch)["predicted"]
    same = float(np.mean(regraded == chosen["predicted"].to_numpy()))
    return {"n": n, "images": int(len(index)), "index": "explain/index.csv", "same_grade_as_prediction": same,
            "groups": {g: int((index["group"] == g).sum()) for g in GROUPS},
            "method": "Grad-CAM (grad-cam package) on the last convolutional feature map; regression: the "
                      "grade score, classification: the predicted grade's logit; one view, no TTA"}



# --------------------------------------------------------------------------- the job's part


def screening_outputs(p, summary: dict, predictions: pd.DataFrame, inputs: Inputs, checkpoint: Checkpoint,
                      prepare: PrepareConfig) -> None:
    """The contact sheet of ungradable photographs and the Grad-CAM overlays (``--predict.explain``,
    config section ``p``); their summary goes into ``summary`` and predict.json."""
    summary["quality_sheet"] = write_quality_sheet(p.output, predictions, lambda rows: stored_or_raw(inputs, rows))
    if p.explain:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        grader = Grader(checkpoint, device)  # the model and transforms that predicted, without TTA
        summary["explain"] = write_explain(p.output, predictions, p.explain, grader,
                                           lambda rows: stored_or_raw(inputs, rows, prepare))
        print(f"explain: {summary['explain']['images']} Grad-CAM overlays in {storage.join(p.output, 'explain')}/")
    storage.write_text(storage.join(p.output, "predict.json"), json.dumps(summary, indent=2))


def stored_or_raw(inputs: Inputs, rows: pd.DataFrame, prepare: PrepareConfig | None = None) -> list[np.ndarray]:
    """Images of a few prediction rows, read again: the photographs (raw inputs; preprocessed as
    for prediction when ``prepare`` is given) or the stored images (a prepared split)."""
    if inputs.kind == "prepared":
        table = read_split(inputs.dataset, inputs.split, ["id", "image", "height", "width"],
                           ids=rows["id"].astype(str).tolist())
        by_id = dict(zip(table.column("id").to_pylist(), decode_batch(table.to_pydict(), inputs.encoding)))
        return [by_id[i] for i in rows["id"]]
    wanted = {str(source) for source in rows["source"]}
    # npz pixels, the disk a file was listed on: of these rows only, not an index of every input
    records = {item["source"]: item for item in inputs.items if item["source"] in wanted}
    # Decoded at the size prediction decoded them (a thumbnail of the photograph needs no more).
    needed = decode_size(prepare or PrepareConfig())
    photos = [read_image(records.get(str(source), {"source": str(source)}), 1, needed=needed)
              for source in rows["source"]]
    return [preprocess(photo, prepare) for photo in photos] if prepare is not None else photos
