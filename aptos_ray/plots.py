"""Figures people look at: learning curves, validation QWK, confusion matrices (matplotlib, Agg)."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from aptos_ray.data.format import GRADE_NAMES  # noqa: E402


def png_bytes(fig) -> bytes:
    """A pyplot figure as PNG bytes (and closed: figures left open pile up in long jobs)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def learning_curves(history: list[dict]) -> bytes:
    """Train/val loss and validation QWK/accuracy per epoch, one PNG."""
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_score) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    ax_loss.plot(epochs, [h["val_loss"] for h in history], "o-", label="validation")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="Loss")
    ax_loss.legend()
    ax_score.plot(epochs, [h["val_qwk"] for h in history], "o-", label="QWK")
    ax_score.plot(epochs, [h["val_acc"] for h in history], "s--", label="accuracy", alpha=0.7)
    ax_score.plot(epochs, [h["val_kappa"] for h in history], "^--", label="Cohen kappa", alpha=0.7)
    ax_score.set(xlabel="epoch", ylim=(min(0, *[h["val_qwk"] for h in history]), 1), title="Validation")
    ax_score.legend()
    for ax in (ax_loss, ax_score):
        ax.grid(alpha=0.3)
    return png_bytes(fig)


def confusion_matrix(matrix, title: str = "Confusion matrix") -> bytes:
    """Counts with row-normalised colour: each row shows where one true grade went."""
    m = np.asarray(matrix, dtype=float)
    rows = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(5.2, 4.4))
    ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
    for (i, j), count in np.ndenumerate(m):
        ax.text(j, i, int(count), ha="center", va="center", color="white" if rows[i, j] > 0.5 else "black")
    labels = [f"{g}\n{n}" for g, n in enumerate(GRADE_NAMES)]
    ax.set_xticks(range(5), labels, fontsize=7)
    ax.set_yticks(range(5), labels, fontsize=7)
    ax.set(xlabel="predicted grade", ylabel="true grade", title=title)
    return png_bytes(fig)


def qwk_curves(curves: dict[str, list[tuple[int, float]]], title: str = "Validation QWK") -> bytes:
    """One line per run or trial: {label: [(epoch, qwk), ...]}."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, points in curves.items():
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, "o-", label=label, alpha=0.8)
    ax.set(xlabel="epoch", ylabel="validation QWK", title=title)
    ax.grid(alpha=0.3)
    if len(curves) <= 12:
        ax.legend(fontsize=7)
    return png_bytes(fig)
