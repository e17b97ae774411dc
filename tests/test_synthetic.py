"""The embedded default: procedural fundus photographs in the Kaggle raw layout."""

from __future__ import annotations

import csv
import hashlib
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from aptos_ray.config import SyntheticConfig
from aptos_ray.data.synthetic import (
    APTOS_GRADE_COUNTS,
    COMPLETE_MARKER,
    generate,
    grade_counts,
    lesion_counts,
    render_fundus,
)


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(list(key))


def _fundus_mask(rgb: np.ndarray, erode: int = 9) -> np.ndarray:
    mask = (rgb.max(-1) > 20).astype(np.uint8)
    return cv2.erode(mask, np.ones((erode, erode), np.uint8)) > 0


def _line_kernels(length: int = 9) -> list[np.ndarray]:
    kernels = []
    for deg in range(0, 180, 10):
        k = np.zeros((length, length), np.uint8)
        c = length // 2
        dx, dy = c * np.cos(np.radians(deg)), c * np.sin(np.radians(deg))
        cv2.line(k, (round(c - dx), round(c - dy)), (round(c + dx), round(c + dy)), 1, 1)
        kernels.append(k)
    return kernels


LINES = _line_kernels()


def dark_spot_pixels(rgb: np.ndarray, threshold: float = 0.25) -> int:
    """Pixels of small dark (red-lesion-like) spots: relative darkness of the green channel
    minus its best opening by a short line. Vessels contain such lines and survive the
    opening; round spots (microaneurysms, haemorrhages) do not (the classic MA detector)."""
    g = rgb[..., 1].astype(np.float32) + 8
    darkness = cv2.GaussianBlur(-np.log(g / cv2.GaussianBlur(g, (0, 0), 10)), (0, 0), 0.7)
    vessels = np.max([cv2.morphologyEx(darkness, cv2.MORPH_OPEN, k) for k in LINES], 0)
    return int(((darkness - vessels > threshold) & _fundus_mask(rgb, 15)).sum())


def _auc(neg: np.ndarray, pos: np.ndarray) -> float:
    """Mann-Whitney AUC: 0.5 = no separation, 0 or 1 = perfect."""
    greater = (pos[:, None] > neg[None, :]).mean()
    ties = (pos[:, None] == neg[None, :]).mean()
    return float(greater + 0.5 * ties)


# ----------------------------------------------------------------------------- one image


def test_render_shape_dtype_and_deterministic():
    a = render_fundus(2, _rng(0, 1), size=128)
    assert a.shape == (128, 128, 3) and a.dtype == np.uint8
    assert np.array_equal(a, render_fundus(2, _rng(0, 1), size=128))
    assert not np.array_equal(a, render_fundus(2, _rng(0, 2), size=128))
    for size in (32, 64, 384):
        assert render_fundus(4, _rng(3), size=size).shape == (size, size, 3)


def test_render_rejects_bad_grade():
    with pytest.raises(ValueError):
        render_fundus(5, _rng(0))
    with pytest.raises(ValueError):
        lesion_counts(-1, _rng(0))


def test_fundus_looks_like_a_fundus():
    means, radii = [], []
    for k in range(20):
        img = render_fundus(k % 5, _rng(1, k))
        corners = [img[:12, :12], img[:12, -12:], img[-12:, :12], img[-12:, -12:]]
        assert all(c.max() == 0 for c in corners), "black outside the round aperture"
        inside = img[_fundus_mask(img)]
        r, g, b = inside.reshape(-1, 3).mean(0)
        assert r > 1.3 * g > b, f"red-dominant orange fundus, got mean RGB {r:.0f} {g:.0f} {b:.0f}"
        means.append(inside.mean())
        radii.append(np.sqrt(_fundus_mask(img, 1).sum() / np.pi))
    # Different "cameras": brightness and field size vary from photo to photo.
    assert np.std(means) > 8 and np.ptp(means) > 30
    assert np.ptp(radii) > 8


def test_same_seed_differs_only_in_lesions():
    healthy = render_fundus(0, _rng(2, 0)).astype(int)
    for grade in (1, 3):
        diseased = render_fundus(grade, _rng(2, 0)).astype(int)
        changed = (np.abs(diseased - healthy).max(-1) > 12).mean()
        assert 0 < changed < 0.2, f"grade {grade}: {changed:.3f} of the pixels changed"


def test_lesion_counts_overlap_between_neighbouring_grades():
    draws = {g: [lesion_counts(g, _rng(3, g, k)) for k in range(300)] for g in range(5)}
    ma = {g: np.array([d["ma"] for d in draws[g]]) for g in range(5)}
    haem = {g: np.array([d["haem"] for d in draws[g]]) for g in range(5)}
    assert ma[0].max() == 0 and haem[0].max() == 0 and ma[1].min() >= 1
    assert ma[1].mean() < ma[2].mean() < ma[3].mean()
    assert haem[1].mean() < haem[2].mean() < haem[3].mean()
    # Overlap: some grade-2 images have fewer lesions than some grade-1 images, and so on.
    assert ma[2].min() < ma[1].max() and haem[3].min() < haem[2].max()
    assert all(d["nv"] >= 1 for d in draws[4]) and all(d["nv"] == 0 for g in range(4) for d in draws[g])
    assert all(d["beading"] >= 1 and d["cws"] >= 1 for d in draws[3])


# ----------------------------------------------------------------------------- learnable, not trivial


@pytest.fixture(scope="module")
def paired_images() -> dict[int, list[np.ndarray]]:
    """100 images: 20 eyes, each at all five grades (same anatomy and camera per eye)."""
    return {g: [render_fundus(g, _rng(4, k)) for k in range(20)] for g in range(5)}


def test_red_lesion_feature_grows_with_grade(paired_images):
    feature = {g: np.array([dark_spot_pixels(im) for im in ims]) for g, ims in paired_images.items()}
    means = [feature[g].mean() for g in range(5)]
    assert means[0] < means[1] < means[2] < means[3], means
    assert means[4] > means[1], means
    grades = np.repeat(np.arange(5), 20)
    values = np.concatenate([feature[g] for g in range(5)])
    rho = np.corrcoef(np.argsort(np.argsort(grades)), np.argsort(np.argsort(values)))[0, 1]
    assert rho > 0.5, f"Spearman correlation of the feature with grade: {rho:.2f}"
    # Not trivial: neighbouring grades overlap in the feature.
    for g in range(3):
        assert feature[g + 1].min() < feature[g].max(), (g, feature[g], feature[g + 1])


def test_yellow_lesions_appear_from_grade_two(paired_images):
    def yellow_pixels(rgb: np.ndarray) -> int:
        f = rgb.astype(np.float32)
        background = cv2.medianBlur(rgb, 21).astype(np.float32)
        spots = ((f[..., 1] - background[..., 1] > 15) & _fundus_mask(rgb)).astype(np.uint8)
        _, _, stats, _ = cv2.connectedComponentsWithStats(spots)
        areas = stats[1:, cv2.CC_STAT_AREA]
        return int(areas[areas < 80].sum())  # small spots: not the optic disc

    feature = {g: np.mean([yellow_pixels(im) for im in ims]) for g, ims in paired_images.items()}
    assert feature[1] < feature[2] < feature[3], feature
    assert feature[4] > feature[1], feature


def test_grade_one_not_separable_from_zero_by_mean_colour():
    def mean_colour(img: np.ndarray) -> np.ndarray:
        return img[_fundus_mask(img)].reshape(-1, 3).mean(0)

    zero = np.array([mean_colour(render_fundus(0, _rng(5, 0, k), 128)) for k in range(40)])
    one = np.array([mean_colour(render_fundus(1, _rng(5, 1, k), 128)) for k in range(40)])
    for channel in range(3):
        auc = _auc(zero[:, channel], one[:, channel])
        assert abs(auc - 0.5) < 0.2, f"channel {channel}: AUC {auc:.2f}"
    brightness = _auc(zero.mean(1), one.mean(1))
    assert abs(brightness - 0.5) < 0.2


# ----------------------------------------------------------------------------- the dataset


def test_grade_counts_follow_aptos_imbalance():
    assert grade_counts(3662) == list(APTOS_GRADE_COUNTS)
    for n in (7, 20, 100, 600, 1001):
        counts = grade_counts(n)
        assert sum(counts) == n
        assert min(counts) >= min(3, n // 5)
    counts = grade_counts(600)
    exact = 600 * np.array(APTOS_GRADE_COUNTS) / sum(APTOS_GRADE_COUNTS)
    assert np.abs(np.array(counts) - exact).max() < 1
    assert counts == [296, 61, 164, 31, 48]  # 49%, 10%, 27%, 5%, 8%
    assert grade_counts(12) == [3, 2, 3, 2, 2]  # every grade present in a tiny set


def _files_digest(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_generate_writes_kaggle_layout(tmp_path):
    cfg = SyntheticConfig(output=str(tmp_path / "raw"), num_images=25, image_size=64, seed=3)
    out = generate(cfg)
    assert out == Path(cfg.output)
    with open(out / "train.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["id_code"] for r in rows] == [f"syn_{i:06d}" for i in range(25)]
    grades = [int(r["diagnosis"]) for r in rows]
    assert [grades.count(g) for g in range(5)] == grade_counts(25)
    assert grades != sorted(grades), "shuffled: ids must not reveal the grade"
    for r in rows:
        img = cv2.imread(str(out / "train_images" / f"{r['id_code']}.png"))
        assert img is not None and img.shape == (64, 64, 3)
    assert (out / COMPLETE_MARKER).is_file()
    assert not [p for p in tmp_path.iterdir() if p.name != "raw"], "no temporary folders left"


def test_generate_is_deterministic_and_skips_when_complete(tmp_path):
    a = SyntheticConfig(output=str(tmp_path / "a"), num_images=12, image_size=64, seed=7)
    b = SyntheticConfig(output=str(tmp_path / "b"), num_images=12, image_size=64, seed=7)
    digest = _files_digest(generate(a))
    assert digest == _files_digest(generate(b)), "same seed -> byte-identical CSV and images"

    csv_path = Path(a.output) / "train.csv"
    before = csv_path.stat().st_mtime_ns
    generate(a)
    assert csv_path.stat().st_mtime_ns == before, "an identical complete output is not rewritten"

    a.seed = 8  # another config at the same place replaces the old generation
    assert _files_digest(generate(a)) != digest


def test_generate_never_overwrites_a_foreign_folder(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not synthetic")
    with pytest.raises(FileExistsError):
        generate(SyntheticConfig(output=str(foreign), num_images=10, image_size=64))
    assert (foreign / "notes.txt").read_text() == "not synthetic"


def test_generate_redoes_an_interrupted_output(tmp_path):
    cfg = SyntheticConfig(output=str(tmp_path / "raw"), num_images=10, image_size=64)
    out = generate(cfg)
    (out / COMPLETE_MARKER).write_text("{}")  # e.g. written by an older generator version
    (out / "train.csv").unlink()
    generate(cfg)
    assert (out / "train.csv").is_file()


@pytest.mark.slow
def test_generation_speed(tmp_path):
    """The default 600 images at 256 px in well under 30 s of one core."""
    cfg = SyntheticConfig(output=str(tmp_path / "raw"), num_images=600, image_size=256)
    start = time.process_time()
    generate(cfg)
    assert time.process_time() - start < 30
