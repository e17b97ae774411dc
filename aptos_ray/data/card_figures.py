"""Figures of the data card (``data.card``): grades per split and thumbnail grids, drawn on matplotlib's
Agg canvas directly (no pyplot, no global backend), so a card can be written from any thread."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from aptos_ray.data.format import GRADE_NAMES, GRADES, SPLITS

THUMB = 112  # px per thumbnail in the image grids

def grades_figure(counts: dict[str, list[int]], path: Path) -> None:
    fig = Figure(figsize=(7.5, 3.6))
    ax = fig.subplots()
    width = 0.8 / len(SPLITS)
    x = np.arange(len(GRADES))
    for k, s in enumerate(SPLITS):
        bars = ax.bar(x + (k - (len(SPLITS) - 1) / 2) * width, counts[s], width, label=f"{s} ({sum(counts[s])})")
        ax.bar_label(bars, fontsize=7)
    ax.set_xticks(x, [f"{g}\n{GRADE_NAMES[g]}" for g in GRADES])
    ax.set_ylabel("images")
    ax.set_title("Grades per split")
    ax.legend(frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def thumb(img: np.ndarray | None) -> np.ndarray:
    """Letterbox an image into a THUMB x THUMB tile; a grey tile when it is missing."""
    tile = np.full((THUMB, THUMB, 3), 90 if img is None else 0, np.uint8)
    if img is None:
        return tile
    h, w = img.shape[:2]
    scale = THUMB / max(h, w)
    th, tw = max(1, round(h * scale)), max(1, round(w * scale))
    small = np.asarray(Image.fromarray(img).resize((tw, th), Image.BILINEAR))
    y, x = (THUMB - th) // 2, (THUMB - tw) // 2
    tile[y:y + th, x:x + tw] = small
    return tile


def grid_figure(rows: list[list[np.ndarray | None]], captions: list[list[str]], labels: list[str],
                 path: Path, title: str, label_colors: list[str] | None = None) -> None:
    """One mosaic image in one axes (fast: no subplot per thumbnail), captions under tiles."""
    ncols = max(1, max((len(r) for r in rows), default=1))
    gap = 22  # px under each tile for its caption
    mosaic = np.full((len(rows) * (THUMB + gap), ncols * (THUMB + 4), 3), 255, np.uint8)
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            y, x = r * (THUMB + gap), c * (THUMB + 4)
            mosaic[y:y + THUMB, x:x + THUMB] = thumb(img)
    dpi, left, top = 100, 1.1, 0.35  # margins in inches: row labels, title
    w, h = mosaic.shape[1] / dpi, mosaic.shape[0] / dpi  # the mosaic at 1 image px per figure px
    fig = Figure(figsize=(w + left, h + top), dpi=dpi)
    ax = fig.add_axes((left / (w + left), 0, w / (w + left), h / (h + top)))
    ax.imshow(mosaic, interpolation="nearest")
    for r, row in enumerate(captions):
        for c, text in enumerate(row):
            ax.text(c * (THUMB + 4) + THUMB / 2, r * (THUMB + gap) + THUMB + 2, text, ha="center", va="top",
                    fontsize=6)
        if not rows[r]:
            ax.text(4, r * (THUMB + gap) + THUMB / 2, "(none)", va="center", fontsize=8, color="grey")
    ax.set_yticks([r * (THUMB + gap) + THUMB / 2 for r in range(len(rows))], labels, fontsize=8)
    for tick, color in zip(ax.get_yticklabels(), label_colors or []):
        tick.set_color(color)
    ax.set_xticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    fig.suptitle(title, fontsize=10, x=0.5, y=1.0, va="top")
    fig.savefig(path, dpi=dpi)
