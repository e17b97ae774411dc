"""Every figure the project draws (charts, image grids, heatmap overlays), and the one way it becomes
a PNG (``png``). Built on matplotlib's object-oriented API (``matplotlib.figure.Figure`` with its own
Agg canvas), not the state-machine interface: no global backend switch, no registry of open figures
to close, and a figure can be drawn from any thread or Ray worker.
"""

from __future__ import annotations

import io

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from PIL import Image

from aptos_ray.data.format import GRADE_NAMES

TILE = 112  # px per thumbnail in image grids
GRADE_TICKS = [f"{g}\n{name}" for g, name in enumerate(GRADE_NAMES)]


def png(item: Figure | np.ndarray, dpi: int = 100) -> bytes:
    """PNG bytes of a figure (cropped to what is drawn) or of a uint8 RGB image (pixel for pixel)."""
    buf = io.BytesIO()
    if isinstance(item, np.ndarray):
        Image.fromarray(item).save(buf, format="PNG", optimize=True)
    else:
        item.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return buf.getvalue()


def _chart(width: float, height: float, columns: int = 1):
    """A figure whose axes constrained layout keeps from overlapping their labels."""
    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.subplots(1, columns)


# --------------------------------------------------------------------------- charts


def learning_curves(history: list[dict]) -> Figure:
    """Train/val loss and validation QWK, accuracy and kappa per epoch."""
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_score) = _chart(10, 3.8, columns=2)
    ax_loss.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    ax_loss.plot(epochs, [h["val_loss"] for h in history], "o-", label="validation")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="Loss")
    ax_score.plot(epochs, [h["val_qwk"] for h in history], "o-", label="QWK")
    ax_score.plot(epochs, [h["val_acc"] for h in history], "s--", label="accuracy", alpha=0.7)
    ax_score.plot(epochs, [h["val_kappa"] for h in history], "^--", label="Cohen kappa", alpha=0.7)
    ax_score.set(xlabel="epoch", ylim=(min(0, *[h["val_qwk"] for h in history]), 1), title="Validation")
    for ax in (ax_loss, ax_score):
        ax.legend()
        ax.grid(alpha=0.3)
    return fig


def qwk_curves(curves: dict[str, list[tuple[int, float]]], title: str = "Validation QWK") -> Figure:
    """One line per run or trial: {label: [(epoch, qwk), ...]}."""
    fig, ax = _chart(7, 4)
    for label, points in curves.items():
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, "o-", label=label, alpha=0.8)
    ax.set(xlabel="epoch", ylabel="validation QWK", title=title)
    ax.grid(alpha=0.3)
    if len(curves) <= 12:
        ax.legend(fontsize=7)
    return fig


def confusion_matrix(matrix, title: str = "Confusion matrix") -> Figure:
    """Counts with row-normalised colour: each row shows where one true grade went."""
    m = np.asarray(matrix, dtype=float)
    rows = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    fig, ax = _chart(5.2, 4.4)
    ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
    for (i, j), count in np.ndenumerate(m):
        ax.text(j, i, int(count), ha="center", va="center", color="white" if rows[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(GRADE_TICKS)), GRADE_TICKS, fontsize=7)
    ax.set_yticks(range(len(GRADE_TICKS)), GRADE_TICKS, fontsize=7)
    ax.set(xlabel="predicted grade", ylabel="true grade", title=title)
    return fig


def roc(referable: dict) -> Figure:
    """ROC of the referable score (``infer.report.referable_metrics``) with the grade-based operating
    point and, when there is one, the referral point marked."""
    fig, ax = _chart(4.8, 4.4)
    ax.plot([0, 1], [0, 1], ":", color="grey", label="chance")
    if referable["roc"]:
        ax.plot(referable["roc"]["fpr"], referable["roc"]["tpr"], "-", lw=2,
                label=f"{referable['score']} (AUC {referable['auc']:.3f})")
    else:
        ax.text(0.5, 0.4, "ROC undefined:\nonly one class present", ha="center")
    points = [(referable, "o", "crimson", "operating point"), (referable.get("referral") or {}, "s", "darkgreen",
                                                               "referral point")]
    for point, marker, colour, name in points:
        if point.get("sensitivity") is not None and point.get("specificity") is not None:
            ax.plot(1 - point["specificity"], point["sensitivity"], marker, ms=8, color=colour,
                    label=f"{name} ({point['operating_point']})")
    ax.set(xlabel="1 - specificity (false-positive rate)", ylabel="sensitivity (true-positive rate)",
           title="Referable DR (grade >= 2)", xlim=(-0.02, 1.02), ylim=(-0.02, 1.02))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=7)
    return fig


def grouped_bars(series: dict[str, list[int]], title: str, size: tuple[float, float] = (5.6, 3.4),
                 counts_on_bars: bool = False) -> Figure:
    """Images per grade, one bar per series side by side (true vs predicted, or one per split)."""
    fig, ax = _chart(*size)
    width = 0.8 / len(series)
    x = np.arange(len(GRADE_TICKS))
    for k, (label, counts) in enumerate(series.items()):
        bars = ax.bar(x + (k - (len(series) - 1) / 2) * width, counts, width, label=label)
        if counts_on_bars:
            ax.bar_label(bars, fontsize=7)
    ax.set_xticks(x, GRADE_TICKS, fontsize=7)
    ax.set(ylabel="images", title=title)
    ax.legend(fontsize=7, frameon=False)
    ax.grid(alpha=0.3, axis="y")
    return fig


def histogram(series: dict[str, np.ndarray], xlabel: str, title: str, bins: int | np.ndarray = 40,
              limits: tuple[float, ...] = ()) -> Figure:
    """Overlaid histograms on shared bins; dashed vertical lines at ``limits``."""
    fig, ax = _chart(6.5, 3.2)
    for label, values in series.items():
        ax.hist(values, bins=bins, alpha=0.6 if len(series) > 1 else 1.0, label=label)
    for limit in limits:
        ax.axvline(limit, color="black", linestyle="--", linewidth=1)
    ax.set(xlabel=xlabel, ylabel="images", title=title)
    if len(series) > 1:
        ax.legend(frameon=False)
    return fig


# --------------------------------------------------------------------------- image grids


def thumbnail(image: np.ndarray | None, size: int = TILE) -> np.ndarray:
    """``image`` letterboxed into a size x size tile (black bars); a grey tile when it is missing."""
    tile = np.full((size, size, 3), 90 if image is None else 0, np.uint8)
    if image is None:
        return tile
    h, w = image.shape[:2]
    scale = size / max(h, w)
    th, tw = max(1, round(h * scale)), max(1, round(w * scale))
    # reducing_gap: a box pre-reduction first, so large photographs shrink without aliasing
    small = np.asarray(Image.fromarray(image).resize((tw, th), Image.BILINEAR, reducing_gap=2.0))
    y, x = (size - th) // 2, (size - tw) // 2
    tile[y:y + th, x:x + tw] = small
    return tile


def mosaic(rows: list[list[np.ndarray | None]], captions: list[list[str]], title: str,
           labels: list[str] | None = None, label_colours: list[str] | None = None, tile: int = TILE) -> Figure:
    """Rows of thumbnails in ONE image in one axes (no subplot per tile: fast at any count), at one
    image pixel per figure pixel (``png`` at its default dpi), captions under the tiles, an optional
    label per row."""
    ncols = max(1, max((len(r) for r in rows), default=1))
    gap = 22  # px under each tile for its two-line caption
    pitch_x, pitch_y = tile + 4, tile + gap
    # RGBA, opaque: matplotlib draws an RGB image through float copies of it, an RGBA one in about
    # a third less memory (100 rather than 150 MB for a sheet of 48 tiles), with the same pixels.
    sheet = np.full((max(1, len(rows)) * pitch_y, ncols * pitch_x, 4), 255, np.uint8)
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            sheet[r * pitch_y:r * pitch_y + tile, c * pitch_x:c * pitch_x + tile, :3] = thumbnail(image, tile)
    dpi, left, top = 100, (1.1 if labels else 0.0), 0.35  # margins in inches: row labels, title
    w, h = sheet.shape[1] / dpi, sheet.shape[0] / dpi
    fig = Figure(figsize=(w + left, h + top), dpi=dpi)
    ax = fig.add_axes((left / (w + left), 0, w / (w + left), h / (h + top)))
    ax.imshow(sheet, interpolation="nearest")
    for r, row in enumerate(captions):
        for c, text in enumerate(row):
            ax.text(c * pitch_x + tile / 2, r * pitch_y + tile + 2, text, ha="center", va="top", fontsize=6)
        if not rows[r]:
            ax.text(4, r * pitch_y + tile / 2, "(none)", va="center", fontsize=8, color="grey")
    ax.set_yticks([r * pitch_y + tile / 2 for r in range(len(rows))] if labels else [], labels or [], fontsize=8)
    for tick, colour in zip(ax.get_yticklabels(), label_colours or []):
        tick.set_color(colour)
    ax.set_xticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    fig.suptitle(title, fontsize=10, x=0.5, y=1.0, va="top")
    return fig


# --------------------------------------------------------------------------- heatmaps


def overlay(image: np.ndarray, heatmap: np.ndarray, weight: float = 0.55) -> np.ndarray:
    """uint8 RGB: ``image`` blended with ``heatmap`` (values in [0, 1]) in the jet colour map
    (``weight`` = the image's share), brightest pixel at 255.

    Outside the fundus (black frame) the image stays black, so the map reads as part of the eye.
    """
    colours = colormaps["jet"](np.clip(heatmap, 0, 1))[..., :3]
    blended = (1 - weight) * colours + weight * image.astype(np.float32) / 255.0
    out = np.uint8(255 * blended / max(float(blended.max()), 1e-6))
    frame = image.max(axis=2) < 10
    out[frame] = image[frame]
    return out
