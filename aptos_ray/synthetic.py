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
import math
import os
import shutil
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

from aptos_ray.config import SyntheticConfig
from aptos_ray.errors import ExistingFileError

# Bump when the drawing changes: a finished output with another version is regenerated.
GENERATOR_VERSION = 1
# APTOS 2019 train.csv grade counts (3,662 images): the class imbalance we reproduce.
APTOS_GRADE_COUNTS = (1805, 370, 999, 193, 295)
COMPLETE_MARKER = ".complete"
PNG_LEVEL = 3  # zlib level: writing is a third of the generation time at higher levels

_AA = 2  # vessel masks are drawn at 2x and area-downsampled: sub-pixel widths that taper


@dataclass
class _Eye:
    """Geometry of one photograph, in pixels of the output image."""

    size: int
    cx: float
    cy: float
    r: float  # fundus radius
    side: int  # +1 when the macula lies to the right of the disc (temporal direction)
    disc: tuple[float, float]
    disc_r: float
    macula: tuple[float, float]
    scale: float  # size / 256: lesion sizes are tuned at 256 px

    def inside(self, x: np.ndarray, y: np.ndarray, margin: float = 0.94) -> np.ndarray:
        return (x - self.cx) ** 2 + (y - self.cy) ** 2 < (margin * self.r) ** 2


@dataclass
class _Vessel:
    points: np.ndarray  # (n, 2) float x, y
    widths: np.ndarray  # (n,) px at output scale
    vein: bool


# --------------------------------------------------------------------------- geometry


def _make_eye(rng: np.random.Generator, size: int) -> _Eye:
    # Cameras differ in field size and centring; some crop the top and bottom of the circle.
    r = size * (rng.uniform(0.5, 0.56) if rng.random() < 0.25 else rng.uniform(0.42, 0.49))
    cx = size / 2 + rng.normal(0, 0.015 * size)
    cy = size / 2 + rng.normal(0, 0.015 * size)
    side = 1 if rng.random() < 0.5 else -1  # left or right eye
    macula = (cx + side * rng.uniform(0.0, 0.1) * r, cy + rng.normal(0, 0.03) * r)
    disc = (macula[0] - side * rng.uniform(0.45, 0.55) * r, macula[1] - rng.uniform(-0.02, 0.06) * r)
    return _Eye(size, cx, cy, r, side, disc, rng.uniform(0.1, 0.13) * r, macula, size / 256)


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    return x, y


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise in about [-1, 1]: a small random grid, bicubically upsampled."""
    small = rng.standard_normal((cells, cells)).astype(np.float32)
    return cv2.resize(small, (size, size), interpolation=cv2.INTER_CUBIC)


# --------------------------------------------------------------------------- background


def _background(rng: np.random.Generator, eye: _Eye, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Orange-red fundus with uneven illumination, vignetting, choroidal texture and macula."""
    red = rng.uniform(0.74, 0.92)
    colour = np.array([red, red * rng.uniform(0.33, 0.56), red * rng.uniform(0.07, 0.2)], np.float32)
    # Illumination centre off the optical axis: one side of the photo is brighter.
    lx = eye.cx + rng.normal(0, 0.12) * eye.r
    ly = eye.cy + rng.normal(0, 0.12) * eye.r
    d = np.sqrt((x - lx) ** 2 + (y - ly) ** 2) / eye.r
    vignette = 1.0 - rng.uniform(0.25, 0.6) * np.minimum(d, 1.3) ** rng.uniform(1.8, 3.5)
    texture = 1.0 + 0.06 * _smooth_noise(rng, eye.size, 5) + 0.025 * _smooth_noise(rng, eye.size, 24)
    shade = (vignette * texture)[..., None]
    img = colour * shade
    # Macula: darker and less yellow; the fovea a little darker still.
    mx, my = eye.macula
    dm2 = ((x - mx) ** 2 + (y - my) ** 2) / (eye.r**2)
    depth = rng.uniform(0.25, 0.4)
    macula = np.exp(-dm2 / (2 * 0.12**2)) * depth + np.exp(-dm2 / (2 * 0.03**2)) * 0.12
    img *= 1.0 - macula[..., None] * np.array([0.6, 1.0, 1.0], np.float32)
    return img


def _draw_disc(rng: np.random.Generator, img: np.ndarray, eye: _Eye) -> None:
    """Bright yellowish optic disc with a paler cup and a soft rim."""
    size = eye.size
    alpha = np.zeros((size, size), np.float32)
    centre = (round(eye.disc[0] * 4), round(eye.disc[1] * 4))
    axes = (round(eye.disc_r * 4), round(eye.disc_r * rng.uniform(1.0, 1.2) * 4))
    cv2.ellipse(alpha, centre, axes, 0, 0, 360, 1.0, -1, cv2.LINE_AA, shift=2)
    alpha = cv2.GaussianBlur(alpha, (0, 0), max(0.5, eye.disc_r * 0.1)) * 0.92
    cup = np.zeros_like(alpha)
    cup_axes = (round(axes[0] * rng.uniform(0.3, 0.55)), round(axes[1] * rng.uniform(0.35, 0.6)))
    cup_centre = (centre[0] + round(eye.side * axes[0] * 0.2), centre[1])
    cv2.ellipse(cup, cup_centre, cup_axes, 0, 0, 360, 1.0, -1, cv2.LINE_AA, shift=2)
    cup = cv2.GaussianBlur(cup, (0, 0), max(0.5, eye.disc_r * 0.2))
    level = float(img.reshape(-1, 3)[:, 0].max())  # the disc is brighter than anything around
    disc_colour = np.array([1.0, rng.uniform(0.7, 0.85), rng.uniform(0.35, 0.55)], np.float32) * min(1.0, level * 1.2)
    cup_colour = np.array([1.0, 0.92, 0.72], np.float32) * min(1.0, level * 1.25)
    _lighten(img, alpha, disc_colour)
    _lighten(img, 0.55 * cup, cup_colour)


# --------------------------------------------------------------------------- vessels


def _angle_towards(heading: float, target: float, k: float) -> float:
    diff = math.atan2(math.sin(target - heading), math.cos(target - heading))
    return heading + k * diff


def _walk(
    rng: np.random.Generator,
    eye: _Eye,
    start: tuple[float, float],
    heading: float,
    target: float,
    length: float,
    width: float,
    pull: float = 0.08,
    wiggle: float = 0.08,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A random walk bending towards ``target`` heading: points, headings, tapering widths."""
    step = 0.035 * eye.r
    n = max(2, int(length / step))
    noise = rng.normal(0, wiggle, n)
    x, y = start
    pts, heads = [(x, y)], [heading]
    mx, my = eye.macula
    for i in range(n):
        heading = _angle_towards(heading, target, pull) + noise[i]
        x += step * math.cos(heading)
        y += step * math.sin(heading)
        if (x - eye.cx) ** 2 + (y - eye.cy) ** 2 > (0.97 * eye.r) ** 2:
            break
        if (x - mx) ** 2 + (y - my) ** 2 < (0.1 * eye.r) ** 2:  # the fovea has no vessels
            break
        pts.append((x, y))
        heads.append(heading)
    pts_arr = np.array(pts, np.float32)
    widths = np.linspace(width, width * 0.3, len(pts_arr)).astype(np.float32)
    return pts_arr, np.array(heads, np.float32), widths


def _vessel_tree(
    rng: np.random.Generator,
    eye: _Eye,
    start: tuple[float, float],
    heading: float,
    target: float,
    length: float,
    width: float,
    vein: bool,
    depth: int = 0,
) -> list[_Vessel]:
    """One vessel and, recursively, its thinner branches."""
    # Trunks run smooth; small branches wander more.
    pts, heads, widths = _walk(rng, eye, start, heading, target, length, width, wiggle=0.04 + 0.03 * depth)
    out = [_Vessel(pts, widths, vein)]
    if depth >= 2 or len(pts) < 5:
        return out
    i = int(rng.integers(3, 7))
    while i < len(pts) - 2:
        child_width = float(widths[i]) * rng.uniform(0.5, 0.75)
        if child_width >= 0.35 * eye.scale:
            turn = rng.uniform(0.45, 1.1) * (1 if rng.random() < 0.5 else -1)
            child_heading = float(heads[i]) + turn
            child_len = length * (1 - i / len(pts)) * rng.uniform(0.4, 0.85)
            out += _vessel_tree(rng, eye, tuple(pts[i]), child_heading, child_heading, child_len,
                                child_width, vein, depth + 1)
        i += int(rng.integers(4, 10))
    return out


def _heading(dx: float, dy: float) -> float:
    return math.atan2(dy, dx)


def _vessels(rng: np.random.Generator, eye: _Eye) -> list[_Vessel]:
    """Four arcades (artery + vein each) from the disc, curving around the macula, plus small
    papillomacular vessels."""
    s, r = eye.side, eye.r
    main = 2.4 * eye.scale * rng.uniform(0.85, 1.15)  # a vein's width at the disc, px
    out: list[_Vessel] = []
    arcades = [  # (start direction, target direction, length)
        ((0.35 * s, -1), (s, 0.45), 1.35 * r),  # superior temporal: up, then round the macula
        ((0.35 * s, 1), (s, -0.45), 1.35 * r),  # inferior temporal
        ((-0.6 * s, -1), (-s, -0.4), 0.8 * r),  # superior nasal
        ((-0.6 * s, 1), (-s, 0.4), 0.8 * r),  # inferior nasal
    ]
    for start_dir, target_dir, length in arcades:
        for vein in (True, False):
            jitter = rng.normal(0, 0.15)
            heading = _heading(*start_dir) + jitter + (0.15 if vein else -0.15) * s
            start = (eye.disc[0] + rng.normal(0, 0.2) * eye.disc_r,
                     eye.disc[1] + rng.normal(0, 0.2) * eye.disc_r)
            width = main if vein else main * 0.7
            out += _vessel_tree(rng, eye, start, heading, _heading(*target_dir) + jitter,
                                length * rng.uniform(0.85, 1.1), width, vein)
    for _ in range(int(rng.integers(2, 5))):  # small vessels towards the macula
        heading = _heading(s, rng.uniform(-0.6, 0.6))
        out += _vessel_tree(rng, eye, eye.disc, heading, heading, 0.35 * r, main * 0.35, rng.random() < 0.5, 2)
    return out


def _vessel_masks(
    eye: _Eye, vessels: list[_Vessel], beading: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(vein, artery) coverage masks in [0, 1]; ``beading`` veins get sausage-like beads."""
    big = eye.size * _AA
    masks = {True: np.zeros((big, big), np.float32), False: np.zeros((big, big), np.float32)}
    for v in vessels:
        pts = np.round(v.points * _AA).astype(np.int32)
        thick = np.maximum(1, np.round(v.widths * _AA)).astype(int)
        mask = masks[v.vein]
        for (x0, y0), (x1, y1), t in zip(pts[:-1], pts[1:], thick[:-1]):
            cv2.line(mask, (int(x0), int(y0)), (int(x1), int(y1)), 1.0, int(t), cv2.LINE_AA)
    # Venous beading: alternating bulges along the larger veins (severe NPDR).
    veins = [v for v in vessels if v.vein and len(v.points) > 8 and v.widths[0] > 1.2 * eye.scale]
    for k in rng.permutation(len(veins))[:beading]:
        v = veins[k]
        start = int(rng.integers(1, max(2, len(v.points) // 3)))
        for j in range(start, min(len(v.points), start + 10), 2):
            x, y = v.points[j] * _AA
            radius = float(v.widths[j]) * _AA * rng.uniform(0.9, 1.3)
            cv2.circle(masks[True], (int(x), int(y)), max(1, int(radius)), 1.0, -1, cv2.LINE_AA)
    size = (eye.size, eye.size)
    return (cv2.resize(masks[True], size, interpolation=cv2.INTER_AREA),
            cv2.resize(masks[False], size, interpolation=cv2.INTER_AREA))


def _apply_vessels(img: np.ndarray, vein: np.ndarray, artery: np.ndarray, rng: np.random.Generator) -> None:
    # Vessels absorb green and blue much more than red: they look dark red, veins darker.
    vein_tint = np.array([rng.uniform(0.6, 0.72), 0.42, 0.36], np.float32)
    artery_tint = np.array([rng.uniform(0.8, 0.9), 0.66, 0.6], np.float32)
    img *= 1 - vein[..., None] * (1 - vein_tint)
    img *= 1 - artery[..., None] * (1 - artery_tint)


# --------------------------------------------------------------------------- lesions


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


def _points(rng: np.random.Generator, eye: _Eye, n: int, spread: float, centre=None,
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


def _point(rng: np.random.Generator, eye: _Eye, spread: float, centre=None) -> tuple[float, float]:
    pts = _points(rng, eye, 1, spread, centre)
    return (float(pts[0, 0]), float(pts[0, 1])) if len(pts) else (eye.cx, eye.cy)


def _circle(layer: np.ndarray, x: float, y: float, radius: float, value: float) -> None:
    # shift=2: quarter-pixel precision, so radius-1 dots are not all the same size.
    cv2.circle(layer, (round(x * 4), round(y * 4)), max(1, round(radius * 4)), float(value), -1, cv2.LINE_AA, shift=2)


def _draw_red(rng: np.random.Generator, eye: _Eye, c: dict) -> np.ndarray:
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


def _draw_nv(rng: np.random.Generator, eye: _Eye, red: np.ndarray, centre) -> None:
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


def _draw_preretinal(rng: np.random.Generator, eye: _Eye, red: np.ndarray) -> None:
    """Pre-retinal (boat-shaped) haemorrhage: a large blob with a flat, horizontal top."""
    x, y = _point(rng, eye, 0.25)
    w, h = rng.uniform(0.1, 0.2) * eye.r, rng.uniform(0.08, 0.14) * eye.r
    cv2.ellipse(red, (round(x * 4), round(y * 4)), (round(w * 4), round(h * 4)), 0, 0, 180, 0.85, -1,
                cv2.LINE_AA, shift=2)


def _draw_yellow(rng: np.random.Generator, eye: _Eye, c: dict) -> np.ndarray:
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


def _draw_pale(rng: np.random.Generator, eye: _Eye, c: dict) -> np.ndarray:
    """Alpha of cotton-wool spots: fluffy pale patches along the arcades."""
    s = eye.scale
    pale = np.zeros((eye.size, eye.size), np.float32)
    for x, y in _points(rng, eye, c["cws"], 0.35, centre=eye.disc):
        axes = (round(rng.uniform(3, 6) * s * 4), round(rng.uniform(2, 4) * s * 4))
        cv2.ellipse(pale, (round(x * 4), round(y * 4)), axes, rng.uniform(0, 180), 0, 360,
                    rng.uniform(0.5, 0.8), -1, cv2.LINE_AA, shift=2)
    return cv2.GaussianBlur(pale, (0, 0), 1.6 * s)


def _draw_dark(rng: np.random.Generator, eye: _Eye, c: dict) -> np.ndarray:
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


def _draw_drusen(rng: np.random.Generator, eye: _Eye, c: dict) -> np.ndarray:
    """Alpha of drusen: soft pale-yellow dots that look a little like exudates (any grade)."""
    drusen = np.zeros((eye.size, eye.size), np.float32)
    for x, y in _points(rng, eye, c["drusen"], 0.2):
        _circle(drusen, x, y, rng.uniform(0.8, 1.5) * eye.scale, rng.uniform(0.25, 0.45))
    return cv2.GaussianBlur(drusen, (0, 0), 0.8 * eye.scale)


def _roi(alpha: np.ndarray) -> tuple[slice, slice] | None:
    """Bounding box of a layer's visible part: blending only there is most of the speed."""
    x, y, w, h = cv2.boundingRect((alpha > 1e-3).view(np.uint8))
    return (slice(y, y + h), slice(x, x + w)) if w and h else None


def _darken(img: np.ndarray, alpha: np.ndarray, tint: np.ndarray) -> None:
    # Absorbing lesions multiply: they stay dark on bright and on dim photos alike.
    roi = _roi(alpha)
    if roi is not None:
        img[roi] *= 1 - alpha[roi][..., None] * (1 - tint)


def _lighten(img: np.ndarray, alpha: np.ndarray, colour: np.ndarray) -> None:
    roi = _roi(alpha)
    if roi is not None:
        a = alpha[roi][..., None]
        img[roi] = img[roi] * (1 - a) + colour * a


def _apply_distractors(rng: np.random.Generator, img: np.ndarray, eye: _Eye) -> None:
    c = _distractor_counts(rng)
    _darken(img, _draw_dark(rng, eye, c), np.array([0.45, 0.4, 0.4], np.float32))
    level = float(np.percentile(img[..., 0], 95))
    _lighten(img, _draw_drusen(rng, eye, c), np.array([1.0, 0.85, 0.55], np.float32) * min(1.0, level * 1.05))


def _apply_lesions(rng: np.random.Generator, img: np.ndarray, eye: _Eye, c: dict) -> None:
    _darken(img, _draw_red(rng, eye, c), np.array([rng.uniform(0.5, 0.62), 0.25, 0.22], np.float32))
    if c["laser"]:
        _darken(img, _draw_dark(rng, eye, c), np.array([0.45, 0.4, 0.4], np.float32))
    level = float(np.percentile(img[..., 0], 95))  # lesions are lit like the retina around them
    exudate = np.array([1.0, rng.uniform(0.85, 0.95), rng.uniform(0.35, 0.5)], np.float32)
    _lighten(img, _draw_yellow(rng, eye, c), exudate * min(1.0, level * 1.15))
    cws = np.array([1.0, 0.92, 0.8], np.float32)
    _lighten(img, _draw_pale(rng, eye, c), cws * min(1.0, level * 1.1))


# --------------------------------------------------------------------------- acquisition


def _acquire(rng: np.random.Generator, img: np.ndarray, eye: _Eye, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Camera effects: focus, exposure, gamma, sensor noise, then the black round aperture."""
    s = eye.scale
    sigma = (rng.uniform(0.3, 0.8) if rng.random() < 0.8 else rng.uniform(0.9, 1.8)) * s
    img = cv2.GaussianBlur(img, (0, 0), sigma)
    gain = rng.uniform(0.6, 1.25) * np.array([1.0, rng.uniform(0.9, 1.1), rng.uniform(0.85, 1.2)], np.float32)
    gamma = rng.uniform(0.8, 1.25)
    img *= gain * 255
    # Sensor noise, mostly luminance (one plane broadcast: a third of the random numbers).
    img += rng.standard_normal((eye.size, eye.size, 1), dtype=np.float32) * rng.uniform(1.0, 5.0)
    d = np.sqrt((x - eye.cx) ** 2 + (y - eye.cy) ** 2)
    aperture = np.clip((eye.r - d) / (1.5 * s), 0, 1)  # a soft, anti-aliased rim
    img *= aperture[..., None]
    out = np.clip(img + 0.5, 0, 255).astype(np.uint8)
    # Gamma through a lookup table: a float power over the whole image costs more than the rest.
    lut = np.clip(255 * (np.arange(256) / 255) ** gamma + 0.5, 0, 255).astype(np.uint8)
    return cv2.LUT(out, lut)


def render_fundus(grade: int, rng: np.random.Generator, size: int = 256) -> np.ndarray:
    """One synthetic fundus photograph of DR ``grade`` (0..4): uint8 RGB (size, size, 3)."""
    if grade not in (0, 1, 2, 3, 4):
        raise ValueError(f"grade must be 0..4, got {grade}")
    # Independent streams: the same seed gives the same eye and camera whatever the grade,
    # so images of one seed at two grades differ only in their lesions.
    anatomy, distractors, lesions, camera = (np.random.default_rng(int(k)) for k in rng.integers(0, 2**63 - 1, 4))
    eye = _make_eye(anatomy, size)
    x, y = _grid(size)
    img = _background(anatomy, eye, x, y)
    _draw_disc(anatomy, img, eye)
    vessels = _vessels(anatomy, eye)
    counts = lesion_counts(grade, lesions)
    vein, artery = _vessel_masks(eye, vessels, counts["beading"], lesions)
    _apply_vessels(img, vein, artery, anatomy)
    _apply_distractors(distractors, img, eye)
    _apply_lesions(lesions, img, eye, counts)
    return _acquire(camera, img, eye, x, y)


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
    images.mkdir(parents=True)
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
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        _write(cfg, tmp)
        if is_complete(cfg):  # another process generated the same while we did
            return out
        if out.exists():  # an older generation (other config or version), or an empty folder
            shutil.rmtree(out)
        try:
            os.rename(tmp, out)
        except OSError:
            if not is_complete(cfg):  # lost a race to another writer of the same config?
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
