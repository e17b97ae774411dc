"""The synthetic fundus's grade-dependent lesions and the artefacts every grade has (see ``synthetic``)."""

from __future__ import annotations

import math

import cv2
import numpy as np

from aptos_ray.data.synthetic_eye import Eye, darken, lighten


def lesion_counts(grade: int, rng: np.random.Generator) -> dict[str, int]:
    """How many of each lesion an image of this grade gets: overlapping distributions."""
    p = rng.poisson
    c = dict(ma=0, haem=0, exudate=0, cws=0, beading=0, nv=0, preretinal=0, laser=0)
    if grade == 1:
        c.update(ma=1 + p(3), haem=int(rng.random() < 0.15), exudate=int(rng.random() < 0.1) * int(rng.integers(1, 3)))
    elif grade == 2:
        c.update(ma=2 + p(7), haem=p(4), exudate=p(6) if rng.random() < 0.8 else 0,
                 cws=int(rng.random() < 0.25))
    elif grade == 3:
        c.update(ma=4 + p(10), haem=8 + p(12), exudate=p(7), cws=1 + p(2),
                 beading=int(rng.integers(1, 4)))
    elif grade == 4:
        c.update(ma=2 + p(9), haem=3 + p(8), exudate=p(7), cws=p(1.5),
                 beading=int(rng.random() < 0.4) * int(rng.integers(1, 3)),
                 nv=1 + int(rng.binomial(2, 0.4)), preretinal=int(rng.random() < 0.35),
                 laser=int(rng.random() < 0.25))
    elif grade != 0:
        raise ValueError(f"grade must be 0..4, got {grade}")
    return {k: int(v) for k, v in c.items()}


def _distractor_counts(rng: np.random.Generator) -> dict[str, int]:
    """Spots every grade has, which a model must learn to ignore: lens dust, pigment, drusen."""
    return dict(dust=int(rng.random() < 0.3) * int(rng.integers(1, 4)),
                pigment=int(rng.random() < 0.25) * int(rng.integers(1, 5)),
                drusen=int(rng.random() < 0.15) * int(rng.integers(2, 8)))


def _points(rng: np.random.Generator, eye: Eye, n: int, spread: float, centre=None,
            quadrants: bool = False) -> np.ndarray:
    """n points inside the fundus, Gaussian around ``centre`` (default: the macula) with
    ``spread`` * r; ``quadrants`` spreads them evenly over the four quadrants instead."""
    if n <= 0:
        return np.zeros((0, 2), np.float32)
    if quadrants:
        theta = (np.arange(n) % 4 + rng.random(n)) * (np.pi / 2)
        rho = eye.r * np.sqrt(rng.uniform(0.04, 0.8, n))
        xy = np.stack([eye.cx + rho * np.cos(theta), eye.cy + rho * np.sin(theta)], 1)
    else:
        cx, cy = centre if centre is not None else eye.macula
        xy = np.stack([cx + rng.normal(0, spread * eye.r, 3 * n + 8),
                       cy + rng.normal(0, spread * eye.r, 3 * n + 8)], 1)
    ok = eye.inside(xy[:, 0], xy[:, 1], 0.92)
    ok &= (xy[:, 0] - eye.disc[0]) ** 2 + (xy[:, 1] - eye.disc[1]) ** 2 > (1.3 * eye.disc_r) ** 2
    return xy[ok][:n].astype(np.float32)


def _point(rng: np.random.Generator, eye: Eye, spread: float, centre=None) -> tuple[float, float]:
    pts = _points(rng, eye, 1, spread, centre)
    return (float(pts[0, 0]), float(pts[0, 1])) if len(pts) else (eye.cx, eye.cy)


def _circle(layer: np.ndarray, x: float, y: float, radius: float, value: float) -> None:
    # shift=2: quarter-pixel precision, so radius-1 dots are not all the same size.
    cv2.circle(layer, (round(x * 4), round(y * 4)), max(1, round(radius * 4)), float(value), -1, cv2.LINE_AA, shift=2)


def _draw_red(rng: np.random.Generator, eye: Eye, c: dict) -> np.ndarray:
    """Alpha of everything dark red: microaneurysms, haemorrhages, new vessels."""
    s = eye.scale
    red = np.zeros((eye.size, eye.size), np.float32)
    for x, y in _points(rng, eye, c["ma"], 0.3):
        _circle(red, x, y, rng.uniform(0.7, 1.5) * s, rng.uniform(0.7, 1.0))
    quadrants = c["haem"] >= 8
    for x, y in _points(rng, eye, c["haem"], 0.4, quadrants=quadrants):
        if rng.random() < 0.3:  # flame: elongated along the nerve fibres
            axes = (round(rng.uniform(3, 6) * s * 4), round(rng.uniform(1, 1.8) * s * 4))
            angle = math.degrees(math.atan2(y - eye.disc[1], x - eye.disc[0]))
            cv2.ellipse(red, (round(x * 4), round(y * 4)), axes, angle, 0, 360,
                        rng.uniform(0.7, 0.95), -1, cv2.LINE_AA, shift=2)
        else:  # blot: a few overlapping dots
            for _ in range(int(rng.integers(1, 4))):
                _circle(red, x + rng.normal(0, 1.2 * s), y + rng.normal(0, 1.2 * s),
                        rng.uniform(1.5, 3.5) * s, rng.uniform(0.7, 0.95))
    for k in range(c["nv"]):
        # NVD (at the disc) or NVE (elsewhere, often along the arcades)
        centre = eye.disc if k == 0 and rng.random() < 0.6 else _point(rng, eye, 0.5, (eye.cx, eye.cy))
        _draw_nv(rng, eye, red, centre)
    if c["preretinal"]:
        _draw_preretinal(rng, eye, red)
    return cv2.GaussianBlur(red, (0, 0), 0.5 * s)


def _draw_nv(rng: np.random.Generator, eye: Eye, red: np.ndarray, centre) -> None:
    """Neovascularisation: a tangle of fine, tortuous, looping new vessels."""
    spread = eye.r * rng.uniform(0.08, 0.14)
    for _ in range(int(rng.integers(6, 12))):
        x = centre[0] + rng.normal(0, spread * 0.5)
        y = centre[1] + rng.normal(0, spread * 0.5)
        heading = rng.uniform(0, 2 * np.pi)
        turns = rng.normal(0, 0.7, 12) + rng.choice([-0.5, 0.5])  # curly, loops back on itself
        pts = [(x, y)]
        for t in turns:
            heading += t
            x += 0.02 * eye.r * math.cos(heading)
            y += 0.02 * eye.r * math.sin(heading)
            pts.append((x, y))
        poly = np.round(np.array(pts) * 4).astype(np.int32)
        cv2.polylines(red, [poly], False, rng.uniform(0.4, 0.7), max(1, round(0.8 * eye.scale)), cv2.LINE_AA, shift=2)


def _draw_preretinal(rng: np.random.Generator, eye: Eye, red: np.ndarray) -> None:
    """Pre-retinal (boat-shaped) haemorrhage: a large blob with a flat, horizontal top."""
    x, y = _point(rng, eye, 0.25)
    w, h = rng.uniform(0.1, 0.2) * eye.r, rng.uniform(0.08, 0.14) * eye.r
    cv2.ellipse(red, (round(x * 4), round(y * 4)), (round(w * 4), round(h * 4)), 0, 0, 180, 0.85, -1,
                cv2.LINE_AA, shift=2)


def _draw_yellow(rng: np.random.Generator, eye: Eye, c: dict) -> np.ndarray:
    """Alpha of hard exudates: sharp, waxy, in clusters near the macula."""
    s = eye.scale
    yellow = np.zeros((eye.size, eye.size), np.float32)
    n = c["exudate"]
    clusters = _points(rng, eye, max(1, n // 5), 0.25)
    radii = rng.uniform(0.9, 2.2, n) * s
    radii[rng.random(n) < 0.1] *= 2  # now and then a waxy plaque
    for i in range(n):
        cx, cy = clusters[i % len(clusters)]
        _circle(yellow, cx + rng.normal(0, 5 * s), cy + rng.normal(0, 5 * s), radii[i], rng.uniform(0.6, 0.95))
    return cv2.GaussianBlur(yellow, (0, 0), 0.6 * s)


def _draw_pale(rng: np.random.Generator, eye: Eye, c: dict) -> np.ndarray:
    """Alpha of cotton-wool spots: fluffy pale patches along the arcades."""
    s = eye.scale
    pale = np.zeros((eye.size, eye.size), np.float32)
    for x, y in _points(rng, eye, c["cws"], 0.35, centre=eye.disc):
        axes = (round(rng.uniform(3, 6) * s * 4), round(rng.uniform(2, 4) * s * 4))
        cv2.ellipse(pale, (round(x * 4), round(y * 4)), axes, rng.uniform(0, 180), 0, 360,
                    rng.uniform(0.5, 0.8), -1, cv2.LINE_AA, shift=2)
    return cv2.GaussianBlur(pale, (0, 0), 1.6 * s)


def _draw_dark(rng: np.random.Generator, eye: Eye, c: dict) -> np.ndarray:
    """Alpha of grey-brown spots: lens dust and pigment dots (any grade), laser scars (grade 4)."""
    s = eye.scale
    dark = np.zeros((eye.size, eye.size), np.float32)
    for x, y in _points(rng, eye, c.get("dust", 0), 0.6, centre=(eye.cx, eye.cy)):
        _circle(dark, x, y, rng.uniform(3, 6) * s, rng.uniform(0.15, 0.3))
    for x, y in _points(rng, eye, c.get("pigment", 0), 0.5, centre=(eye.cx, eye.cy)):
        _circle(dark, x, y, rng.uniform(0.7, 1.4) * s, rng.uniform(0.4, 0.7))
    if c.get("laser"):  # pan-retinal photocoagulation: rows of pigmented scars in the periphery
        n = int(rng.integers(30, 80))
        theta = rng.uniform(0, 2 * np.pi, n)
        rho = eye.r * rng.uniform(0.6, 0.88, n)
        for x, y in zip(eye.cx + rho * np.cos(theta), eye.cy + rho * np.sin(theta)):
            _circle(dark, x, y, rng.uniform(1.5, 2.5) * s, rng.uniform(0.4, 0.7))
    return cv2.GaussianBlur(dark, (0, 0), 0.8 * s)


def _draw_drusen(rng: np.random.Generator, eye: Eye, c: dict) -> np.ndarray:
    """Alpha of drusen: soft pale-yellow dots that look a little like exudates (any grade)."""
    drusen = np.zeros((eye.size, eye.size), np.float32)
    for x, y in _points(rng, eye, c["drusen"], 0.2):
        _circle(drusen, x, y, rng.uniform(0.8, 1.5) * eye.scale, rng.uniform(0.25, 0.45))
    return cv2.GaussianBlur(drusen, (0, 0), 0.8 * eye.scale)


def apply_distractors(rng: np.random.Generator, img: np.ndarray, eye: Eye) -> None:
    c = _distractor_counts(rng)
    darken(img, _draw_dark(rng, eye, c), np.array([0.45, 0.4, 0.4], np.float32))
    level = float(np.percentile(img[..., 0], 95))
    lighten(img, _draw_drusen(rng, eye, c), np.array([1.0, 0.85, 0.55], np.float32) * min(1.0, level * 1.05))


def apply_lesions(rng: np.random.Generator, img: np.ndarray, eye: Eye, c: dict) -> None:
    darken(img, _draw_red(rng, eye, c), np.array([rng.uniform(0.5, 0.62), 0.25, 0.22], np.float32))
    if c["laser"]:
        darken(img, _draw_dark(rng, eye, c), np.array([0.45, 0.4, 0.4], np.float32))
    level = float(np.percentile(img[..., 0], 95))  # lesions are lit like the retina around them
    exudate = np.array([1.0, rng.uniform(0.85, 0.95), rng.uniform(0.35, 0.5)], np.float32)
    lighten(img, _draw_yellow(rng, eye, c), exudate * min(1.0, level * 1.15))
    cws = np.array([1.0, 0.92, 0.8], np.float32)
    lighten(img, _draw_pale(rng, eye, c), cws * min(1.0, level * 1.1))


# --------------------------------------------------------------------------- acquisition
