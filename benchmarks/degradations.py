"""Good photographs made ungradable in known ways: what benchmarks/bench_gradability.py (and the
gradability tests) hold the verdicts of ``aptos_ray.infer.quality`` against."""

from __future__ import annotations

import cv2
import numpy as np


def degrade(rgb: np.ndarray, kind: str) -> np.ndarray:
    """A copy of a good photograph made ungradable in a known way (``DEGRADATIONS[kind]`` expected).

    Strengths are for photographs at about 224 px (the shared folder); "mild" ones are borderline
    cases that the benchmark reports without expecting a verdict.
    """
    img = rgb.astype(np.float32)
    h, w = rgb.shape[:2]
    if kind.startswith("blur"):
        sigma = {"blur": 3.0, "blur_mild": 1.5}[kind]
        out = cv2.GaussianBlur(img, (0, 0), sigma)
    elif kind.startswith("dark"):
        out = img * {"dark": 0.2, "dark_mild": 0.45}[kind]
    elif kind.startswith("bright"):
        gain, lift = {"bright": (2.2, 60.0), "bright_mild": (1.5, 20.0)}[kind]
        out = img * gain + lift * (img.max(axis=2, keepdims=True) > 15)  # the frame stays dark
    elif kind == "crop_half":  # half the disc outside the picture
        out = img[:, : w // 2]
    elif kind == "crop_corner":  # the top-left 2/3: the bottom-right of the disc missing
        out = img[: h * 2 // 3, : w * 2 // 3]
    elif kind == "crop_zoom":  # the middle 50%, enlarged back: no edge of the disc in view
        out = cv2.resize(img[h // 4 : h - h // 4, w // 4 : w - w // 4], (w, h), interpolation=cv2.INTER_CUBIC)
    elif kind == "small":
        out = cv2.resize(img, (w * 2 // 5, h * 2 // 5), interpolation=cv2.INTER_AREA)
    else:
        raise ValueError(f"unknown degradation '{kind}' (one of {', '.join(DEGRADATIONS)})")
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


# kind -> expected reason ("" = gradable; None = borderline, reported without an expectation)
DEGRADATIONS: dict[str, str | None] = {
    "blur": "out of focus", "blur_mild": None,
    "dark": "too dark", "dark_mild": None,
    "bright": "overexposed", "bright_mild": None,
    "crop_half": "fundus cut off", "crop_corner": "fundus cut off", "crop_zoom": "fundus cut off",
    "small": "too small",
}
