"""Where the model looked: Grad-CAM heatmaps of the grade, drawn over the image the model saw.

Grad-CAM (Selvaraju et al. 2017) weighs the last convolutional feature maps by the gradient of the
output with respect to them: bright regions are those whose features pushed the output up. The
output explained is the one the grade was read from: the grade score of a regression head (so
the map shows what raised the predicted severity), the logit of the predicted grade of a
classification head. The ``grad-cam`` package (pytorch-grad-cam) does the hooks and the
weighting; this module picks the layer, the target and the images, and writes the overlays
(``figures.overlay``).

The model and its transforms are the predicting ``Grader``'s own (``Explainer(grader)``), on the
images as preprocessed for prediction, so a heatmap explains the very call in predictions.parquet
(without test-time augmentation: one view).

    select(predictions, n)   -> which images: the n most confident referable, the n most
                                uncertain, the n worst misses against the labels
    Explainer.heatmaps(imgs) -> float32 (N, H, W) in [0, 1] at the images' size
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch import nn

from aptos_ray.metrics import REFERABLE_GRADE

GROUPS = {
    "confident_referable": "most confident referable (predicted grade >= 2, highest score)",
    "uncertain": "most uncertain (score nearest a grade boundary)",
    "miss": "misses against the label (largest grade error first)",
}
EXPLAIN_COLUMNS = ["id", "group", "grade", "predicted", "score", "gradable", "file"]


# --------------------------------------------------------------------------- which images


def uncertainty(predictions: pd.DataFrame, cut_points: list[float] | None) -> np.ndarray:
    """Higher = less sure: nearness of the score to a cut point (regression), or 1 - the top
    probability (classification with probabilities)."""
    probs = [c for c in (f"prob_{g}" for g in range(5)) if c in predictions]
    if len(probs) == 5 and predictions[probs].notna().all(axis=None):
        return 1.0 - predictions[probs].to_numpy(dtype=float).max(axis=1)
    cuts = np.asarray(sorted(cut_points or (0.5, 1.5, 2.5, 3.5)), dtype=float)
    score = predictions["score"].to_numpy(dtype=float)
    return -np.abs(score[:, None] - cuts[None, :]).min(axis=1)


def confidence_referable(predictions: pd.DataFrame) -> np.ndarray:
    if "p_referable" in predictions and predictions["p_referable"].notna().all():
        return predictions["p_referable"].to_numpy(dtype=float)
    return predictions["score"].to_numpy(dtype=float)


def select(predictions: pd.DataFrame, n: int, cut_points: list[float] | None = None) -> pd.DataFrame:
    """Rows of ``predictions`` to explain, with a ``group`` column (one of GROUPS); an image may
    appear in more than one group. Up to ``n`` per group; misses need labels (grade >= 0)."""
    if n <= 0 or predictions.empty:
        return predictions.iloc[:0].assign(group=pd.Series(dtype=str))
    rows = predictions.reset_index(drop=True)
    picked = []
    referable = rows[rows["predicted"] >= REFERABLE_GRADE]
    order = np.argsort(-confidence_referable(referable), kind="stable")[:n]
    picked.append(referable.iloc[order].assign(group="confident_referable"))
    order = np.argsort(-uncertainty(rows, cut_points), kind="stable")[:n]
    picked.append(rows.iloc[order].assign(group="uncertain"))
    missed = rows[(rows["grade"] >= 0) & (rows["grade"] != rows["predicted"])]
    error = (missed["predicted"] - missed["grade"]).abs().to_numpy() + 0.01 * (
        missed["score"] - missed["grade"]).abs().to_numpy()
    picked.append(missed.iloc[np.argsort(-error, kind="stable")[:n]].assign(group="miss"))
    return pd.concat(picked, ignore_index=True)


# --------------------------------------------------------------------------- heatmaps


def last_conv_layer(model: nn.Module, size: int = 64) -> nn.Module:
    """The module that produces the last spatial (N, C, H > 1, W > 1) activation of a forward pass.

    For timm's EfficientNets that is ``bn2`` (conv_head + BatchNorm + activation), the feature map
    the pooling and the head read; found by running the model once, so any timm CNN works. The
    global pool's (N, C, 1, 1) output is 4-D too, but has no "where" left in it.
    """
    seen: list[nn.Module] = []

    def record(module, _inputs, out):
        if torch.is_tensor(out) and out.ndim == 4 and min(out.shape[-2:]) > 1:
            seen.append(module)

    hooks = [m.register_forward_hook(record) for m in model.modules() if m is not model]
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, size, size, device=next(model.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
    if not seen:
        raise ValueError(f"{type(model).__name__}: no convolutional feature map to explain")
    return seen[-1]


class Explainer:
    """Grad-CAM on a ``Grader``'s model and transforms (the ones that produced the prediction)."""

    def __init__(self, grader):
        from pytorch_grad_cam import GradCAM

        self.grader = grader
        self.layer = last_conv_layer(grader.model, grader.size)
        self.cam_class = GradCAM

    def targets(self, images: np.ndarray) -> list:
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        if not self.grader.head.has_probabilities:
            return [ClassifierOutputTarget(0)] * len(images)  # one output: the grade score itself
        predicted = self.grader(images)["predicted"]  # one logit per grade: the predicted grade's
        return [ClassifierOutputTarget(int(g)) for g in predicted]

    def heatmaps(self, images: np.ndarray) -> np.ndarray:
        """float32 (N, H, W) in [0, 1] (each map scaled to its own maximum) for uint8 (N, H, W, 3)."""
        if len(images) == 0:
            return np.zeros((0, *images.shape[1:3]), dtype=np.float32)
        x = self.grader.transforms.eval(images).to(self.grader.device)
        with self.cam_class(model=self.grader.model, target_layers=[self.layer]) as cam:
            maps = cam(input_tensor=x, targets=self.targets(images))  # (N, size, size), min-max scaled
        h, w = images.shape[1:3]
        out = np.stack([cv2_resize(m, w, h) for m in maps]).astype(np.float32)
        return np.clip(out, 0.0, 1.0)


def cv2_resize(heatmap: np.ndarray, width: int, height: int) -> np.ndarray:
    import cv2

    if heatmap.shape == (height, width):
        return heatmap
    return cv2.resize(heatmap.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)


# --------------------------------------------------------------------------- files


def write_explanations(output: str, selection: pd.DataFrame, images: np.ndarray, heatmaps: np.ndarray) -> pd.DataFrame:
    """``<output>/explain/<group>_<id>.png`` overlays and ``explain/index.csv``; returns the index.

    ``images[i]`` and ``heatmaps[i]`` belong to ``selection.iloc[i]`` (the preprocessed image the
    model saw, and its heatmap at the same size).
    """
    from aptos_ray import figures, storage

    rows = []
    for i, row in enumerate(selection.itertuples(index=False)):
        name = f"explain/{row.group}_{safe_name(str(row.id))}.png"
        storage.write_bytes(storage.join(output, name), figures.png(figures.overlay(images[i], heatmaps[i])))
        rows.append({"id": str(row.id), "group": row.group, "grade": int(row.grade), "predicted": int(row.predicted),
                     "score": float(row.score), "gradable": bool(getattr(row, "gradable", True)), "file": name})
    index = pd.DataFrame(rows, columns=EXPLAIN_COLUMNS)
    storage.write_text(storage.join(output, "explain", "index.csv"), index.to_csv(index=False))
    return index


def safe_name(text: str) -> str:
    """An id as a file name: letters, digits, '-', '_' and '.' kept, anything else '_'."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)[:120] or "image"
