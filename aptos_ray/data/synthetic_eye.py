"""The synthetic fundus's anatomy and camera: eye geometry, background, optic disc, vessels, and the
acquisition (focus, exposure, noise, aperture). Lesions are in ``synthetic_lesions``."""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

_AA = 2  # vessel masks are drawn at 2x and area-downsampled: sub-pixel widths that taper


@dataclass
class Eye:
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


def make_eye(rng: np.random.Generator, size: int) -> Eye:
    # Cameras differ in field size and centring; some crop the top and bottom of the circle.
    r = size * (rng.uniform(0.5, 0.56) if rng.random() < 0.25 else rng.uniform(0.42, 0.49))
    cx = size / 2 + rng.normal(0, 0.015 * size)
    cy = size / 2 + rng.normal(0, 0.015 * size)
    side = 1 if rng.random() < 0.5 else -1  # left or right eye
    macula = (cx + side * rng.uniform(0.0, 0.1) * r, cy + rng.normal(0, 0.03) * r)
    disc = (macula[0] - side * rng.uniform(0.45, 0.55) * r, macula[1] - rng.uniform(-0.02, 0.06) * r)
    return Eye(size, cx, cy, r, side, disc, rng.uniform(0.1, 0.13) * r, macula, size / 256)


def grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    return x, y


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise in about [-1, 1]: a small random grid, bicubically upsampled."""
    small = rng.standard_normal((cells, cells)).astype(np.float32)
    return cv2.resize(small, (size, size), interpolation=cv2.INTER_CUBIC)


# --------------------------------------------------------------------------- background


def background(rng: np.random.Generator, eye: Eye, x: np.ndarray, y: np.ndarray) -> np.ndarray:
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


def draw_disc(rng: np.random.Generator, img: np.ndarray, eye: Eye) -> None:
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
    lighten(img, alpha, disc_colour)
    lighten(img, 0.55 * cup, cup_colour)


# --------------------------------------------------------------------------- vessels


def _angle_towards(heading: float, target: float, k: float) -> float:
    diff = math.atan2(math.sin(target - heading), math.cos(target - heading))
    return heading + k * diff


def _walk(
    rng: np.random.Generator,
    eye: Eye,
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
    eye: Eye,
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


def grow_vessels(rng: np.random.Generator, eye: Eye) -> list[_Vessel]:
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


def vessel_masks(
    eye: Eye, vessels: list[_Vessel], beading: int, rng: np.random.Generator
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


def apply_vessels(img: np.ndarray, vein: np.ndarray, artery: np.ndarray, rng: np.random.Generator) -> None:
    # Vessels absorb green and blue much more than red: they look dark red, veins darker.
    vein_tint = np.array([rng.uniform(0.6, 0.72), 0.42, 0.36], np.float32)
    artery_tint = np.array([rng.uniform(0.8, 0.9), 0.66, 0.6], np.float32)
    img *= 1 - vein[..., None] * (1 - vein_tint)
    img *= 1 - artery[..., None] * (1 - artery_tint)


# --------------------------------------------------------------------------- lesions


def acquire(rng: np.random.Generator, img: np.ndarray, eye: Eye, x: np.ndarray, y: np.ndarray) -> np.ndarray:
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


def visible_box(alpha: np.ndarray) -> tuple[slice, slice] | None:
    """Bounding box of a layer's visible part: blending only there is most of the speed."""
    x, y, w, h = cv2.boundingRect((alpha > 1e-3).view(np.uint8))
    return (slice(y, y + h), slice(x, x + w)) if w and h else None


def darken(img: np.ndarray, alpha: np.ndarray, tint: np.ndarray) -> None:
    # Absorbing lesions multiply: they stay dark on bright and on dim photos alike.
    roi = visible_box(alpha)
    if roi is not None:
        img[roi] *= 1 - alpha[roi][..., None] * (1 - tint)


def lighten(img: np.ndarray, alpha: np.ndarray, colour: np.ndarray) -> None:
    roi = visible_box(alpha)
    if roi is not None:
        a = alpha[roi][..., None]
        img[roi] = img[roi] * (1 - a) + colour * a
