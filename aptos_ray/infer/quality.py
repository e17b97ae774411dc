"""Image quality of a fundus photograph: gradable, or ungradable with a reason.

Screening systems answer "refer / do not refer / insufficient image quality"; a grade computed on
a black, blown-out, blurred or half-missing photograph is not one to act on. ``assess`` measures a
few statistics of the photograph as it arrived (before the training preprocessing crops, resizes
and masks it) and turns them into a verdict with fixed, documented thresholds:

    fundus mask   pixels brighter than the dark frame (as ``preprocess.crop_fundus`` finds it), the
                  largest connected part, holes filled
    circle        fitted to the mask's outline where it does not run along the image border: the
                  whole fundus disc, also when the camera cut its top and bottom
    coverage      mask area / circle area: the visible share of the disc
    diameter      the circle's diameter, in pixels of the original photograph
    brightness    median luminance (0-255) inside the fundus
    saturated     share of fundus pixels at luminance >= 240 (blown out)
    sharpness     variance of the Laplacian of the luminance inside the fundus (its rim excluded),
                  measured at one analysis scale (a larger fundus shrunk to ANALYSIS_SIZE px) so that
                  the photograph's own resolution does not change it; a smaller one (a 128 px
                  prepared split) is measured as it is, where blur that shrinking hid cannot be seen

Reasons, checked in this order (the first that applies is reported): fundus not found, too dark,
overexposed, too small, fundus cut off, out of focus. Thresholds were chosen on the shared APTOS
folder (2,929 photographs at 224 px) and on degraded copies of them whose verdict is known; the
measurement is ``benchmarks/bench_gradability.py`` (results in ``benchmarks/RESULTS.md``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import cv2
import numpy as np

from aptos_ray.config import PrepareConfig
from aptos_ray.data.preprocess import Photo

ANALYSIS_SIZE = 224  # px: the fundus is measured at this size (the shared APTOS folder's scale)
MAX_SIDE = 1024  # px: larger photographs are shrunk first (a 3000 px photograph costs 20x more to segment)
SATURATED_LUMINANCE = 240
GRADABLE = ""  # the reason of a gradable image

REASONS = ("fundus not found", "too dark", "overexposed", "too small", "fundus cut off", "out of focus")


@dataclass(frozen=True)
class Thresholds:
    """Where a statistic makes a photograph ungradable. Defaults chosen on data (module docstring)."""

    min_fundus_fraction: float = 0.10  # fundus mask / frame: less than this is no fundus at all
    min_diameter: int = 160  # px of fundus diameter in the photograph; less holds too little detail
    min_brightness: float = 30.0  # median fundus luminance
    max_brightness: float = 170.0
    max_saturated: float = 0.05  # share of blown-out fundus pixels
    min_coverage: float = 0.60  # visible share of the fundus disc
    min_sharpness: float = 50.0  # variance of the Laplacian at ANALYSIS_SIZE


DEFAULT_THRESHOLDS = Thresholds()


@dataclass
class Quality:
    """The verdict on one photograph and the statistics it rests on (NaN where not measurable)."""

    gradable: bool
    reason: str  # "" when gradable, else one of REASONS
    fundus_fraction: float
    diameter: float
    coverage: float
    brightness: float
    saturated: float
    sharpness: float

    def columns(self) -> dict:
        """As the ``quality_*`` columns of predictions.parquet (plus ``gradable``)."""
        values = asdict(self)
        return {"gradable": values.pop("gradable"), "quality_reason": values.pop("reason"),
                **{f"quality_{k}": float(v) for k, v in values.items()}}


QUALITY_COLUMNS = ["gradable", "quality_reason", "quality_fundus_fraction", "quality_diameter", "quality_coverage",
                   "quality_brightness", "quality_saturated", "quality_sharpness"]


# --------------------------------------------------------------------------- measurement


def decode_size(prepare: PrepareConfig) -> int:
    """The size a photograph is decoded for when it is both judged and preprocessed: the stored
    image's, or the analysis scale the sharpness is measured at, whichever is larger."""
    return max(prepare.image_size, ANALYSIS_SIZE)


def luminance(rgb: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY)


def fundus_mask(grey: np.ndarray) -> np.ndarray:
    """bool mask of the fundus: brighter than the frame, largest connected part, holes filled.

    The frame level is the median of the four corners when they are dark (some cameras leave a
    grey 15-30 frame), as in ``preprocess.crop_fundus``; corners that are not dark mean the
    fundus fills the frame, and everything above black counts.
    """
    h, w = grey.shape
    k = max(1, min(h, w) // 20)
    corners = np.concatenate([grey[:k, :k], grey[:k, -k:], grey[-k:, :k], grey[-k:, -k:]], axis=None)
    background = float(np.median(corners))
    threshold = 10 + (background if background < 50 else 0)
    mask = cv2.threshold(grey, threshold, 1, cv2.THRESH_BINARY)[1]  # grey > threshold, as 0/1
    # Opening removes JPEG speckle and burnt-in text in the frame from the mask.
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, kernel)
    # Every part left by the opening holds a whole kernel (17 px), so 16-bit labels (1.6x faster
    # to label) cannot overflow up to 17 * 65535 px (MAX_SIDE^2 is 1.05 M).
    label_type = cv2.CV_16U if mask.size < int(kernel.sum()) * 65535 else cv2.CV_32S
    count, labels, stats, _ = cv2.connectedComponentsWithStatsWithAlgorithm(mask, 8, label_type, cv2.CCL_DEFAULT)
    if count <= 1:
        return np.zeros_like(grey, dtype=bool)
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    mask = cv2.compare(labels, largest, cv2.CMP_EQ)
    # Fill holes (dark lesions, the fovea of a dim photograph): the outer contour, filled.
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    filled = np.zeros_like(mask)
    cv2.drawContours(filled, contours, -1, 1, thickness=cv2.FILLED)
    return filled.view(bool)


def luminance_counts(grey: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """How many fundus pixels have each luminance 0-255 (int64). A masked histogram rather than
    ``grey[mask]``: the median and the blown-out share follow from it without copying and
    sorting the fundus's pixels (2x faster at 1024 px)."""
    counts = cv2.calcHist([grey], [0], mask.view(np.uint8), [256], [0, 256])  # float32, exact below 2^24 px
    return counts.reshape(-1).astype(np.int64)


def median_of_counts(counts: np.ndarray) -> float:
    """``np.median`` of the values 0..255 that ``counts`` describes: for an even count, the mean
    of the two middle values, as NumPy takes it."""
    cumulative = np.cumsum(counts)
    n = int(cumulative[-1])
    low, high = np.searchsorted(cumulative, [(n - 1) // 2, n // 2], side="right")
    return (int(low) + int(high)) / 2


def fit_disc(mask: np.ndarray) -> tuple[float, float, float] | None:
    """(cx, cy, radius) of the circle fitted to the mask's free outline, or None.

    Outline points on (or within 2 px of) the image border are where the camera or a crop cut the
    disc; they are left out, so the circle is the whole disc. A circle rather than an ellipse: on
    the half-discs of the crop test an ellipse fit often collapsed to a thin sliver along the arc
    (coverage > 1), a circle (3 parameters, algebraic least squares) did not. The shared folder's
    discs are slightly oval (resized without keeping the aspect ratio); that costs some accuracy in
    coverage, measured in the benchmark. None when fewer than 20 free outline points remain (the
    disc fills the frame: its edge is not in view).
    """
    contours, _ = cv2.findContours(mask.view(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    if not contours:
        return None
    points = max(contours, key=len).reshape(-1, 2).astype(np.float64)
    h, w = mask.shape
    x, y = points[:, 0], points[:, 1]
    free = (x > 2) & (x < w - 3) & (y > 2) & (y < h - 3)
    if free.sum() < 20:
        return None
    x, y = x[free], y[free]
    # x^2 + y^2 + D x + E y + F = 0 (Kasa's fit): linear in D, E, F.
    design = np.stack([x, y, np.ones_like(x)], axis=1)
    (d, e, f), *_ = np.linalg.lstsq(design, -(x * x + y * y), rcond=None)
    cx, cy = -d / 2, -e / 2
    r2 = cx * cx + cy * cy - f
    if not np.isfinite(r2) or r2 <= 0:
        return None
    return float(cx), float(cy), float(np.sqrt(r2))


def sharpness(grey: np.ndarray, mask: np.ndarray) -> float:
    """Variance of the Laplacian inside the fundus, at ANALYSIS_SIZE px across the fundus.

    A larger fundus box is shrunk to that size first: the Laplacian of one photograph at two
    resolutions differs by orders of magnitude. The mask is eroded so the rim (the strongest edge
    in any fundus photograph, sharp even when the retina is blurred) does not count.
    """
    x, y, w, h = cv2.boundingRect(mask.view(np.uint8))  # the mask's bounding box, 100x faster than np.nonzero
    crop, crop_mask = grey[y:y + h, x:x + w], mask[y:y + h, x:x + w].astype(np.uint8)
    # Shrink only: enlarging a small image (a 128 px prepared one) would blur it and read as out of focus.
    scale = min(1.0, ANALYSIS_SIZE / max(crop.shape))
    if scale < 1:
        size = (max(1, round(crop.shape[1] * scale)), max(1, round(crop.shape[0] * scale)))
        crop = cv2.resize(crop, size, interpolation=cv2.INTER_AREA)
        crop_mask = cv2.resize(crop_mask, size, interpolation=cv2.INTER_NEAREST)
    inner = cv2.erode(crop_mask, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (15, 15))).astype(bool)
    if inner.sum() < 100:
        return float("nan")
    laplacian = cv2.Laplacian(crop.astype(np.float32), cv2.CV_32F, ksize=3)
    return float(laplacian[inner].var())


def assess(rgb: np.ndarray, thresholds: Thresholds = DEFAULT_THRESHOLDS, scale: float = 1.0) -> Quality:
    """The quality verdict on one uint8 RGB photograph (H, W, 3), as it came from the camera.

    ``scale``: original pixels per pixel of ``rgb``, for an image that was resized before (a
    prepared dataset's): the diameter is reported in the original photograph's pixels.
    """
    grey = luminance(rgb)
    h, w = grey.shape
    if max(h, w) > MAX_SIDE:
        shrink = MAX_SIDE / max(h, w)
        grey = cv2.resize(grey, (max(1, round(w * shrink)), max(1, round(h * shrink))), interpolation=cv2.INTER_AREA)
        scale, (h, w) = scale / shrink, grey.shape
    mask = fundus_mask(grey)
    area = cv2.countNonZero(mask.view(np.uint8))
    fraction = area / mask.size
    nan = float("nan")
    if area == 0:
        # Nothing above the frame level: black, or so underexposed that the fundus is gone.
        reason = "too dark" if np.percentile(grey, 99) < 2 * thresholds.min_brightness else "fundus not found"
        return Quality(False, reason, 0.0, nan, nan, float(np.median(grey)), 0.0, nan)
    counts = luminance_counts(grey, mask)
    brightness = median_of_counts(counts)
    saturated = float(counts[SATURATED_LUMINANCE:].sum() / area)
    disc = fit_disc(mask)
    if disc is None:
        diameter, coverage = float(max(h, w)) * scale, 0.0  # no free outline: the edge of the disc is not in view
    else:
        radius = disc[2]
        diameter = 2 * radius * scale
        coverage = float(min(1.0, area / (np.pi * radius**2)))
    sharp = sharpness(grey, mask) if fraction >= thresholds.min_fundus_fraction else nan
    reason = verdict(fraction, diameter, coverage, brightness, saturated, sharp, thresholds)
    return Quality(reason == GRADABLE, reason, fraction, diameter, coverage, brightness, saturated, sharp)


def assess_photo(photo: Photo, thresholds: Thresholds = DEFAULT_THRESHOLDS) -> Quality:
    """``assess`` of a decoded photograph, reduced (``preprocess.decode_photo``) or not, measured at
    the size its full decode is measured at (MAX_SIDE, or its own size when smaller).

    A reduced decode smaller than that is enlarged to it first (cubic): the variance of the
    Laplacian depends on the size the fundus is segmented and cropped at, by up to 2x between 800
    and 1024 px on enlarged APTOS photographs, and measured at the same size the verdicts agree
    (``benchmarks/bench_decode.py``).
    """
    working = min(MAX_SIDE, max(photo.height, photo.width))
    h, w = photo.pixels.shape[:2]
    if max(h, w) >= working:  # decoded in full, or still at least that size: assess shrinks it as usual
        return assess(photo.pixels, thresholds, photo.scale)
    factor = working / max(h, w)
    rgb = cv2.resize(photo.pixels, (round(w * factor), round(h * factor)), interpolation=cv2.INTER_CUBIC)
    return assess(rgb, thresholds, photo.scale / factor)


def verdict(fraction: float, diameter: float, coverage: float, brightness: float, saturated: float,
            sharp: float, t: Thresholds = DEFAULT_THRESHOLDS) -> str:
    """The first reason that applies (order of REASONS), or GRADABLE ("")."""
    if fraction < t.min_fundus_fraction:
        # A dim photograph's fundus may sink into the frame: dark rather than missing.
        return "too dark" if brightness < t.min_brightness else "fundus not found"
    # Exposure first: a dim or blown-out fundus also shrinks the mask that size and coverage rest on.
    if brightness < t.min_brightness:
        return "too dark"
    if brightness > t.max_brightness or saturated > t.max_saturated:
        return "overexposed"
    if diameter < t.min_diameter:
        return "too small"
    if coverage < t.min_coverage:
        return "fundus cut off"
    if not np.isfinite(sharp) or sharp < t.min_sharpness:
        return "out of focus"
    return GRADABLE


def not_assessed(gradable: bool = False) -> Quality:
    """The quality of a row without a verdict: an unreadable file, or a filtered prepared image."""
    return Quality(gradable, "", *[float("nan")] * 6)


def as_columns(qualities: list[Quality]) -> dict[str, np.ndarray]:
    """QUALITY_COLUMNS as numpy arrays (a Ray Data batch's columns)."""
    rows = [q.columns() for q in qualities]
    return {c: np.array([r[c] for r in rows], dtype=bool if c == "gradable" else object if c == "quality_reason"
                        else np.float64) for c in QUALITY_COLUMNS}


def assess_many(images, thresholds: Thresholds = DEFAULT_THRESHOLDS) -> dict[str, np.ndarray]:
    """QUALITY_COLUMNS for a list of RGB photographs (``None`` for one that could not be read)."""
    return as_columns([assess(img, thresholds) if img is not None else not_assessed() for img in images])
