"""The embedded default: a procedural colour-fundus generator in the Kaggle APTOS raw layout.

A fresh checkout has no fundus photographs, so ``generate`` draws them: a round fundus with
camera-like variation (size, centre, colour, exposure, vignetting, focus, noise), the optic
disc, a darker macula, branching tapering vessels (arteries and veins along the arcades), and
grade-dependent lesions:

    0  none (but the artefacts every grade has: dust spots, pigment dots, drusen)
    1  a few microaneurysms (tiny dark-red dots)
    2  more microaneurysms, blot haemorrhages, hard exudates (small waxy yellow spots)
    3  many haemorrhages in all four quadrants, venous beading, cotton-wool spots
    4  neovascularisation (fine irregular new vessels at the disc or elsewhere), sometimes a
       pre-retinal haemorrhage or laser scars, on top of NPDR lesions

Lesion counts come from overlapping distributions, so neighbouring grades overlap the way real
grades do, and grade 1 differs from 0 only in a handful of tiny dots: learnable, not trivial.

Everything is drawn with OpenCV on float32 layers from one seeded ``np.random.Generator`` per
image, so the same seed gives byte-identical files. The generator is split into independent
streams (anatomy, distractors, lesions, camera): one seed rendered at two grades gives the same
eye photographed the same way, differing only in its lesions.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import cv2
import numpy as np

from aptos_ray import storage
from aptos_ray.config import SyntheticConfig
from aptos_ray.data.synthetic_eye import (
    acquire,
    apply_vessels,
    background,
    draw_disc,
    grid,
    grow_vessels,
    make_eye,
    vessel_masks,
)
from aptos_ray.data.synthetic_lesions import (
    apply_distractors,
    apply_lesions,
    lesion_counts,
)
from aptos_ray.errors import ExistingFileError

# Bump when the drawing changes: a finished output with another version is regenerated.
GENERATOR_VERSION = 1
# APTOS 2019 train.csv grade counts (3,662 images): the class imbalance we reproduce.
APTOS_GRADE_COUNTS = (1805, 370, 999, 193, 295)
COMPLETE_MARKER = ".complete"
PNG_LEVEL = 3  # zlib level: writing is a third of the generation time at higher levels

def render_fundus(grade: int, rng: np.random.Generator, size: int = 256) -> np.ndarray:
    """One synthetic fundus photograph of DR ``grade`` (0..4): uint8 RGB (size, size, 3)."""
    if grade not in (0, 1, 2, 3, 4):
        raise ValueError(f"grade must be 0..4, got {grade}")
    # Independent streams: the same seed gives the same eye and camera whatever the grade,
    # so images of one seed at two grades differ only in their lesions.
    anatomy, distractors, lesions, camera = (np.random.default_rng(int(k)) for k in rng.integers(0, 2**63 - 1, 4))
    eye = make_eye(anatomy, size)
    x, y = grid(size)
    img = background(anatomy, eye, x, y)
    draw_disc(anatomy, img, eye)
    vessels = grow_vessels(anatomy, eye)
    counts = lesion_counts(grade, lesions)
    vein, artery = vessel_masks(eye, vessels, counts["beading"], lesions)
    apply_vessels(img, vein, artery, anatomy)
    apply_distractors(distractors, img, eye)
    apply_lesions(lesions, img, eye, counts)
    return acquire(camera, img, eye, x, y)


# --------------------------------------------------------------------------- dataset


def grade_counts(num_images: int) -> list[int]:
    """Images per grade: APTOS proportions by largest-remainder rounding, so they sum to
    ``num_images``; every grade gets at least min(3, n // 5) so small sets still hold all five."""
    weights = np.array(APTOS_GRADE_COUNTS, np.float64)
    exact = num_images * weights / weights.sum()
    counts = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - counts), kind="stable")[: num_images - counts.sum()]:
        counts[i] += 1
    least = min(3, num_images // 5)
    for g in range(len(counts)):
        while counts[g] < least:
            counts[int(np.argmax(counts))] -= 1
            counts[g] += 1
    return [int(c) for c in counts]


def _marker(cfg: SyntheticConfig) -> str:
    # The output folder may move: the marker records what was generated, not where.
    fields = {k: v for k, v in asdict(cfg).items() if k != "output"}
    return json.dumps({"generator_version": GENERATOR_VERSION, **fields}, sort_keys=True) + "\n"


def is_complete(cfg: SyntheticConfig) -> bool:
    marker = Path(cfg.output) / COMPLETE_MARKER
    return marker.is_file() and marker.read_text() == _marker(cfg)


def _write(cfg: SyntheticConfig, folder: Path) -> None:
    images = folder / "train_images"
    images.mkdir()
    grades = np.repeat(np.arange(5), grade_counts(cfg.num_images))
    # Shuffled so that ids carry no grade; one generator per image so images are independent.
    grades = np.random.default_rng([cfg.seed, 0]).permutation(grades)
    lines = ["id_code,diagnosis"]
    for i, grade in enumerate(grades):
        id_code = f"syn_{i:06d}"
        rgb = render_fundus(int(grade), np.random.default_rng([cfg.seed, 1, i]), cfg.image_size)
        if not cv2.imwrite(str(images / f"{id_code}.png"), rgb[..., ::-1], [cv2.IMWRITE_PNG_COMPRESSION, PNG_LEVEL]):
            raise OSError(f"could not write {images / id_code}.png")
        lines.append(f"{id_code},{int(grade)}")
    (folder / "train.csv").write_text("\n".join(lines) + "\n")
    (folder / COMPLETE_MARKER).write_text(_marker(cfg))


def generate(cfg: SyntheticConfig) -> Path:
    """Write ``<output>/train.csv`` + ``<output>/train_images/<id>.png`` (Kaggle layout).

    Deterministic by ``cfg.seed``; skipped when the same config was already generated there.
    Written to a temporary sibling folder and renamed, so readers never see half a dataset.
    """
    if cfg.num_images < 1 or cfg.image_size < 32:
        raise ValueError(f"synthetic: need num_images >= 1 and image_size >= 32, got {cfg}")
    out = Path(cfg.output)
    if is_complete(cfg):
        return out
    if out.exists() and any(out.iterdir()) and not (out / COMPLETE_MARKER).is_file():
        # Never delete a folder we did not write: the user may have pointed output at real data.
        raise ExistingFileError(f"synthetic.output {out} exists and is not a synthetic dataset; choose another folder")
    with storage.publish_dir(str(out)) as folder:
        _write(cfg, folder)
    return out
