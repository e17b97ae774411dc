"""The evaluation report: one model, rendered to report.md and (jinja2) report.html, saying the same
things; the figures drawn without pyplot's global state."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from markupsafe import escape
from PIL import Image

from aptos_ray import figures
from aptos_ray.infer.report import write_report
from aptos_ray.infer.report_render import Table, build_report

REPO = Path(__file__).resolve().parents[1]


def screened_output(tmp_path: Path) -> tuple[Path, pd.DataFrame]:
    """A predict folder with labelled predictions, ungradable rows whose ids need escaping, a contact
    sheet and one Grad-CAM overlay."""
    rng = np.random.default_rng(0)
    n = 40
    grade = rng.integers(0, 5, n)
    predicted = np.clip(grade + rng.integers(-1, 2, n), 0, 4)
    ungradable = np.arange(n) % 8 == 0
    predictions = pd.DataFrame({"id": [f"<b>img|{i}</b>" for i in range(n)], "grade": grade, "predicted": predicted,
                                "score": predicted + rng.normal(0, 0.3, n), "gradable": ~ungradable,
                                "quality_reason": np.where(ungradable, "too dark", "")})
    image = (rng.random((48, 48, 3)) * 255).astype(np.uint8)
    (tmp_path / "explain").mkdir()
    (tmp_path / "explain" / "miss_a.png").write_bytes(figures.png(figures.overlay(image, rng.random((48, 48)))))
    pd.DataFrame([{"id": "<script>x</script>", "group": "miss", "grade": 2, "predicted": 0, "score": 0.2,
                   "gradable": True, "file": "explain/miss_a.png"}]).to_csv(tmp_path / "explain" / "index.csv", index=False)
    (tmp_path / "quality_flagged.png").write_bytes(figures.png(figures.mosaic([[image, None]], [["a", "b"]], "sheet")))
    return tmp_path, predictions


def test_markdown_and_html_say_the_same_things(tmp_path):
    out, predictions = screened_output(tmp_path)
    context = {"cut_points": [0.5, 1.5, 2.5, 3.5], "cut_rule": "max QWK", "num_inputs": 41, "num_predicted": 40,
               "num_unreadable": 1}
    metrics = write_report(str(out), predictions, context, resamples=20)
    md, html = (out / "report.md").read_text(), (out / "report.html").read_text()
    report = build_report(metrics, context, {"confusion": b"", "roc": b"", "grades": b""})
    titles = [s.title for s in report.sections]
    assert titles == ["What was evaluated", "Agreement with the graders", "Referable diabetic retinopathy (grade >= 2)",
                      "Per grade", "Image quality", "Caveats"]  # no explain index given here: no Grad-CAM section
    for title in [*titles, "Where the model looked"]:
        assert f"## {title}" in md and f"<h2>{title.replace('>', '&gt;')}</h2>" in html
    cells = {str(c) for s in report.sections for b in s.blocks if isinstance(b, Table) for row in b.rows for c in row}
    for cell in cells:
        assert cell.replace("|", "\\|") in md and str(escape(cell)) in html, cell
    assert "QWK 95% interval" in md and "QWK 95% interval" in html  # once only in one of them
    assert "Seed baseline: the original notebook" in md and "Seed baseline: the original notebook" in html
    # autoescaped HTML: ids from the data never become markup; Markdown tables survive a "|"
    assert "<script>" not in html and "&lt;script&gt;x&lt;/script&gt;" in html and "<b>img" not in html
    assert "| <b>img\\|0</b> | too dark |" in md
    # figures: three charts, the contact sheet and the overlay embedded; linked by name in the Markdown
    assert html.count('src="data:image/png;base64,') == 5 and ".png\"" not in html
    for name in ("roc_referable.png", "confusion_matrix.png", "grade_distribution.png", "quality_flagged.png",
                 "explain/miss_a.png"):
        assert f"]({name})" in md
        assert (out / name).read_bytes()[:4] == b"\x89PNG"


def test_figures_are_drawn_without_pyplot():
    """One drawing style, matplotlib's Figure API: no pyplot anywhere in the package, so no global
    backend or figure registry that a thread or a long job could trip over."""
    users = [p.name for p in (REPO / "aptos_ray").rglob("*.py") if re.search(r"pyplot|matplotlib\.use", p.read_text())]
    assert not users
    history = [{"epoch": 1, "train_loss": 1.0, "val_loss": 1.0, "val_qwk": 0.5, "val_acc": 0.5, "val_kappa": 0.4}]
    for figure in (figures.learning_curves(history), figures.qwk_curves({"a": [(1, 0.5)]}), figures.confusion_matrix(np.eye(5)),
                   figures.histogram({"x": np.arange(10.0)}, "x", "t", limits=(2.0,))):
        assert figures.png(figure)[:4] == b"\x89PNG"


def test_the_html_template_ships_as_package_data():
    tomllib = pytest.importorskip("tomllib")
    package_data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    shipped = {p for pattern in package_data["aptos_ray.infer"] for p in (REPO / "aptos_ray" / "infer").glob(pattern)}
    assert REPO / "aptos_ray" / "infer" / "templates" / "report.html.j2" in shipped


def test_mosaic_is_one_image_pixel_per_figure_pixel():
    wide = np.zeros((30, 60, 3), np.uint8)
    wide[..., 0] = 255
    png = figures.png(figures.mosaic([[wide, wide, wide]], [["a", "b", "c"]], "title", tile=100))
    with Image.open(io.BytesIO(png)) as im:
        red = np.asarray(im.convert("RGB"))
    red = (red[..., 0] > 200) & (red[..., 1] < 60)
    # each 60 x 30 image letterboxed into a 100 px tile: 100 x 50 px of red, three times side by side
    assert abs(int(red.any(axis=0).sum()) - 300) <= 3 and abs(int(red.any(axis=1).sum()) - 50) <= 2
