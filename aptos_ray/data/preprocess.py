"""Pure array functions that turn a fundus photograph into the stored square image.

Every function takes and returns numpy arrays (uint8 RGB unless said otherwise) and does
its work with OpenCV / Pillow, so that the same code runs on the driver, in Ray Data tasks
and in tests. ``preprocess`` composes them in the order the config asks for:

    crop the black border -> pad-resize to a square -> normalise (optional: Ben Graham, grey world,
    CLAHE of the green channel) -> circle mask (optional)
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from aptos_ray.config import PrepareConfig
from aptos_ray.errors import ImageError

# PIL's own protection against decompression bombs stays on; fundus photographs are < 50 MP, and
# prepare.max_pixels quarantines larger ones from the header, before a single pixel is decoded.
BEN_GRAHAM_RADIUS = 0.9  # Ben Graham masked at 90% of the radius: hides the bright ring the filter leaves at the rim


def _to_rgb_mode(img: Image.Image) -> Image.Image:
    """Bring the modes numpy cannot make sense of (palette, CMYK, YCbCr, ...) to RGB(A)/L/I."""
    if img.mode == "P":
        # A palette may carry transparency; keep it as alpha so it is blanked like RGBA.
        return img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGB", "RGBA", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F", "1"):
        return img
    return img.convert("RGB")  # CMYK, YCbCr, LAB, HSV, PA, La, RGBa, ...


# The shorter side a JPEG is decoded to, per pixel of the largest size the caller needs (the stored
# image, the quality check's analysis scale): the fundus may fill as little as half the shorter side
# of the frame, and a reduction from at least twice the final size keeps INTER_AREA averaging real
# pixels, so reduced and full decodes agree (benchmarks/bench_decode.py measures how closely).
DECODE_MARGIN = 2
JPEG_REDUCTIONS = (8, 4, 2)  # the factors libjpeg decodes at in the DCT domain (PIL ``Image.draft``)
TURNED = (5, 6, 7, 8)  # EXIF orientations that turn the photograph by 90 degrees: width and height swap


class Photo(NamedTuple):
    """A decoded photograph: its pixels (possibly reduced) and the size the file holds."""

    pixels: np.ndarray  # uint8 (h, w, 3) RGB, EXIF orientation applied
    height: int  # of the full photograph, EXIF orientation applied
    width: int

    @property
    def scale(self) -> float:
        """Photograph pixels per pixel of ``pixels`` (1.0 when decoded in full)."""
        return self.height / self.pixels.shape[0]


def load_image(path: str | Path, max_pixels: int = 0, needed: int = 0) -> np.ndarray:
    """Read a local image file -> uint8 (H, W, 3) RGB; ``ImageError`` says why a file is unusable."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ImageError("missing file") from None
    except OSError as e:
        raise ImageError(f"unreadable file: {e.strerror or e}") from None
    return decode_image(data, max_pixels, needed)


def decode_image(data: bytes, max_pixels: int = 0, needed: int = 0) -> np.ndarray:
    """An image file's bytes -> uint8 (H, W, 3) RGB (``decode_photo``'s pixels)."""
    return decode_photo(data, max_pixels, needed).pixels


def decode_photo(data: bytes, max_pixels: int = 0, needed: int = 0) -> Photo:
    """An image file's bytes -> ``Photo``; ``ImageError`` says why they are unusable.

    ``max_pixels`` (0: no limit) is checked on the header's size, before decoding: a 100 KB PNG can
    hold a 10000 x 10000 image that takes 300 MB and seconds to decode. ``needed`` (0: full size)
    is the largest size, in pixels, that the caller makes of the photograph: a JPEG is then decoded
    at the smallest power-of-two reduction (``reduction``) whose shorter side is still at least
    ``DECODE_MARGIN`` times that, in the DCT domain, which skips most of the decoding work of a
    full-size photograph. Other formats are decoded in full.
    """
    if not data:
        raise ImageError("zero-byte file")
    try:
        with warnings.catch_warnings():
            if max_pixels:  # our limit, checked on opening, replaces PIL's warning about large images
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
        with img:
            width, height = img.size
            check_pixels(width, height, max_pixels)
            factor = reduction(width, height, needed)
            if factor > 1:  # a no-op for formats without a reduced decode (only JPEG has one)
                img.draft(img.mode, (width // factor, height // factor))
            img.load()  # decode now: a truncated file fails here, not later
            orientation = img.getexif().get(ExifTags.Base.Orientation)
            if orientation in TURNED:
                width, height = height, width
            if orientation in range(2, 9):  # else exif_transpose only copies the image (1 ms at 1/4 of 12 MP)
                img = ImageOps.exif_transpose(img) or img
            arr = np.asarray(_to_rgb_mode(img))
    except ImageError:  # a ValueError too: keep its reason as it is
        raise
    except UnidentifiedImageError:
        raise ImageError("not an image") from None
    except (OSError, SyntaxError, ValueError) as e:
        text = str(e)
        if "truncated" in text or "broken data stream" in text or "end of file" in text.lower():
            raise ImageError("truncated image") from None
        raise ImageError(f"unreadable image: {text}") from None
    except Image.DecompressionBombError as e:  # pragma: no cover - PIL's own limit, > 179 MP
        raise ImageError(f"image too large: {e}") from None
    return Photo(to_rgb_uint8(arr), height, width)


def reduction(width: int, height: int, needed: int) -> int:
    """The largest JPEG reduction factor that leaves the shorter side >= DECODE_MARGIN * needed (1: none)."""
    if needed <= 0:
        return 1
    return next((f for f in JPEG_REDUCTIONS if min(width, height) >= f * DECODE_MARGIN * needed), 1)


def check_pixels(width: int, height: int, max_pixels: int) -> None:
    if max_pixels and width * height > max_pixels:
        raise ImageError(f"image too large: {height}x{width} = {width * height / 1e6:.1f} MP "
                         f"> prepare.max_pixels {max_pixels / 1e6:.1f} MP")


def to_rgb_uint8(arr: np.ndarray) -> np.ndarray:
    """Any grey / grey+alpha / RGB / RGBA array of bool, uint8, uint16, int or float -> uint8 (H, W, 3).

    Alpha is composited onto black, the colour of a fundus photograph's background.
    16-bit data is scaled by 1/257 (65535 -> 255); floats in [0, 1] are scaled by 255.
    """
    arr = np.asarray(arr)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 2, 3, 4) or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ImageError(f"unsupported image shape {arr.shape}")
    alpha = None
    if arr.shape[2] in (2, 4):
        arr, alpha = arr[:, :, :-1], arr[:, :, -1:]
    arr, alpha = _to_uint8(arr), None if alpha is None else _to_uint8(alpha)
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    if alpha is not None:
        arr = (arr.astype(np.uint16) * alpha // 255).astype(np.uint8)
    return np.ascontiguousarray(arr)


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    if np.issubdtype(arr.dtype, np.floating):
        scale = 255.0 if arr.size and np.nanmax(arr) <= 1.0 else 1.0
        return np.clip(np.nan_to_num(arr) * scale + 0.5, 0, 255).astype(np.uint8)
    if np.issubdtype(arr.dtype, np.integer):
        # uint16 / PIL's "I" (int32 holding 16-bit data): full 16-bit range -> 8 bits.
        return (np.clip(arr, 0, 65535).astype(np.uint32) // 257).astype(np.uint8)
    raise ImageError(f"unsupported pixel type {arr.dtype}")


def crop_fundus(arr: np.ndarray, threshold: int = 10, min_fraction: float = 0.05) -> np.ndarray:
    """Crop the dark border around the fundus disc.

    A pixel is fundus when it is ``threshold`` brighter than the border (the median of the four
    corners when they are dark: some cameras leave a frame of grey 15-30, not 0). A row/column
    belongs to the fundus when more than ``min_fraction`` of it is fundus, rather than any pixel,
    so JPEG noise, a hot pixel or a small burnt-in label in the frame do not stop the crop (a disc
    touching the frame loses < 0.1% of its height to this). An all-dark image, or one whose
    bright part is implausibly small (< 10% of a side), is returned unchanged: cropping it would
    only magnify noise. An image without a border is returned unchanged too.
    """
    top, bottom, left, right = fundus_box(arr, threshold, min_fraction)
    if (top, bottom, left, right) == (0, arr.shape[0], 0, arr.shape[1]):
        return arr  # the image itself, not a view of it
    return arr[top:bottom, left:right]


def fundus_box(arr: np.ndarray, threshold: int = 10, min_fraction: float = 0.05) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the crop ``crop_fundus`` makes; the whole image when it makes none."""
    grey = cv2.cvtColor(arr, cv2.COLOR_RGB2GRAY) if arr.ndim == 3 else arr
    h, w = grey.shape
    k = max(1, min(h, w) // 20)
    corners = np.concatenate([grey[:k, :k], grey[:k, -k:], grey[-k:, :k], grey[-k:, -k:]], axis=None)
    background = float(np.median(corners))
    mask = grey > threshold + (background if background < 50 else 0)
    rows = np.flatnonzero(np.count_nonzero(mask, axis=1) > min_fraction * w)
    cols = np.flatnonzero(np.count_nonzero(mask, axis=0) > min_fraction * h)
    if rows.size == 0 or cols.size == 0:
        return 0, h, 0, w
    top, bottom, left, right = int(rows[0]), int(rows[-1] + 1), int(cols[0]), int(cols[-1] + 1)
    if bottom - top < 0.1 * h or right - left < 0.1 * w:
        return 0, h, 0, w
    return top, bottom, left, right


def circle_mask(arr: np.ndarray, radius_fraction: float = 1.0, fill: int = 0) -> np.ndarray:
    """Set everything outside the circle inscribed in the image (times ``radius_fraction``) to ``fill``."""
    h, w = arr.shape[:2]
    mask = np.zeros((h, w), dtype=np.uint8)
    radius = max(1, int(round(min(h, w) / 2 * radius_fraction)))
    cv2.circle(mask, (w // 2, h // 2), radius, 1, thickness=-1, lineType=cv2.LINE_8)
    out = np.full(arr.shape, fill, dtype=arr.dtype)  # C order whatever arr's layout: OpenCV needs it
    cv2.copyTo(np.ascontiguousarray(arr), mask, out)  # in C: a boolean-index copy costs 15x more
    return out


def resize_pad(arr: np.ndarray, size: int) -> np.ndarray:
    """Resize so the longer side is ``size``, then pad the shorter side with black to a square.

    Never stretches: a fundus disc cropped at the top and bottom stays round. INTER_AREA when
    shrinking (it averages, so no aliasing); INTER_CUBIC when enlarging (e.g. 28 px RetinaMNIST).
    """
    h, w = arr.shape[:2]
    scale = size / max(h, w)
    new_w, new_h = max(1, min(size, round(w * scale))), max(1, min(size, round(h * scale)))
    if (new_h, new_w) != (h, w):
        interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
        arr = cv2.resize(arr, (new_w, new_h), interpolation=interpolation)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    return cv2.copyMakeBorder(
        arr, top, size - new_h - top, left, size - new_w - left, cv2.BORDER_CONSTANT, value=0
    )


def shrink_to(arr: np.ndarray, max_side: int) -> np.ndarray:
    """Shrink (INTER_AREA) so the longer side is at most ``max_side``; a smaller image is returned as it is."""
    h, w = arr.shape[:2]
    if max(h, w) <= max_side:
        return arr
    scale = max_side / max(h, w)
    return cv2.resize(arr, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)


def ben_graham(arr: np.ndarray, sigma: float) -> np.ndarray:
    """4 * img - 4 * GaussianBlur(img, sigma) + 128, saturated to uint8 (Ben Graham, Kaggle DR 2015).

    Subtracting the local average removes lighting and camera colour differences between clinics
    and keeps the lesions (small, high-contrast structures).
    """
    blurred = cv2.GaussianBlur(arr, (0, 0), sigmaX=float(sigma))
    return cv2.addWeighted(arr, 4.0, blurred, -4.0, 128.0)  # uint8 in, uint8 out: saturating


def grey_world(arr: np.ndarray, fundus_threshold: int = 10) -> np.ndarray:
    """Scale each channel so that its mean over the fundus equals the mean of the three (grey-world
    colour constancy): a camera's colour cast, as a gain per channel, cancels; brightness is kept.

    Only the fundus (any channel brighter than ``fundus_threshold``) is averaged, so the black frame
    does not count. Hand-written: OpenCV's grey-world balance is in the contrib build (cv2.xphoto),
    which is not a dependency.
    """
    fundus = arr.max(axis=2) > fundus_threshold
    if not fundus.any():
        return arr
    means = arr[fundus].mean(axis=0)
    gains = means.mean() / np.maximum(means, 1.0)
    return np.clip(arr * gains + 0.5, 0, 255).astype(np.uint8)


def clahe_green(arr: np.ndarray, clip_limit: float = 2.0, tiles: int = 8) -> np.ndarray:
    """The green channel (where haemorrhages, microaneurysms and exudates contrast most), equalised by
    OpenCV's CLAHE in ``tiles`` x ``tiles`` tiles, in all three channels: exposure and colour cast of
    the camera both go; so does the colour itself."""
    green = cv2.createCLAHE(clipLimit=clip_limit, tileGridSize=(tiles, tiles)).apply(np.ascontiguousarray(arr[:, :, 1]))
    return np.dstack([green] * 3)


def normalisation(cfg: PrepareConfig) -> str:
    """The normalisation ``cfg`` asks for: prepare.normalise, or ben_graham by the older switch (datasets
    and checkpoints from before prepare.normalise carry only that)."""
    return "ben_graham" if cfg.ben_graham else cfg.normalise


def normalise(arr: np.ndarray, cfg: PrepareConfig) -> np.ndarray:
    method = normalisation(cfg)
    if method == "ben_graham":
        return ben_graham(arr, cfg.ben_graham_sigma or cfg.image_size / 30)
    if method == "grey_world":
        return grey_world(arr)
    if method == "clahe_green":
        return clahe_green(arr)
    return arr


def preprocess(arr: np.ndarray, cfg: PrepareConfig) -> np.ndarray:
    """One image -> uint8 (size, size, 3), per the ``prepare`` config."""
    arr = to_rgb_uint8(arr)
    if cfg.crop_border:
        arr = crop_fundus(arr)
    arr = resize_pad(arr, cfg.image_size)
    arr = normalise(arr, cfg)
    if cfg.circle_mask:
        # After Ben Graham the neutral value is 128, and the rim ring is cut (radius 0.9).
        if normalisation(cfg) == "ben_graham":
            arr = circle_mask(arr, BEN_GRAHAM_RADIUS, fill=128)
        else:
            arr = circle_mask(arr)
    return arr
