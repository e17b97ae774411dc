"""Reduced decoding of full-size photographs (preprocess.decode_photo) on small generated "full-size"
JPEGs (1600 x 1200: large enough for a DCT-domain reduction, small enough to stay fast): the
reduced decode gives what the full decode gives, within the limits benchmarks/RESULTS.md states."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
from PIL import Image

from aptos_ray.config import PrepareConfig
from aptos_ray.data.prepare import process_record
from aptos_ray.data.preprocess import ImageError, decode_photo, fundus_box, preprocess, reduction
from aptos_ray.data.sources import read_photo
from aptos_ray.data.synthetic import render_fundus
from aptos_ray.infer.predict import load_rows
from aptos_ray.infer.quality import assess, assess_photo, decode_size
from benchmarks.degradations import degrade

WIDTH, HEIGHT = 1600, 1200
# Reduced vs full decode, preprocessed (the figures of benchmarks/bench_decode.py, with room for the
# encoder's variation): mean absolute difference per channel, PSNR, crop box in output pixels.
MAX_MEAN_ABS_DIFF = 1.5  # of 255
MIN_PSNR = 35.0  # dB
MAX_BOX_OUTPUT_PX = 1.0


def framed(rgb: np.ndarray, size: tuple[int, int] = (WIDTH, HEIGHT)) -> np.ndarray:
    """A square fundus photograph enlarged to the frame's height, centred in a black 4:3 frame."""
    w, h = size
    out = np.zeros((h, w, 3), np.uint8)
    out[:, (w - h) // 2:(w - h) // 2 + h] = cv2.resize(rgb, (h, h), interpolation=cv2.INTER_CUBIC)
    return out


def jpeg(rgb: np.ndarray, **kwargs) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=90, **kwargs)
    return buf.getvalue()


@pytest.fixture(scope="module")
def photos(aptos_dir) -> dict[str, np.ndarray]:
    """Two synthetic photographs drawn at full size (real fine detail) and one enlarged APTOS photograph."""
    real = next(p for p in sorted((aptos_dir / "images").iterdir()) if p.suffix == ".png")
    return {"synthetic0": framed(render_fundus(0, np.random.default_rng(3), HEIGHT)),
            "synthetic4": framed(render_fundus(4, np.random.default_rng(4), HEIGHT)),
            "aptos": framed(np.asarray(Image.open(real).convert("RGB")))}


def test_reduction_is_the_smallest_that_keeps_twice_the_size_needed():
    assert reduction(3888, 2592, 256) == 4 and reduction(3888, 2592, 128) == 8 and reduction(3888, 2592, 512) == 2
    assert reduction(1600, 1200, 256) == 2 and reduction(1600, 1200, 600) == 1 and reduction(224, 224, 128) == 1
    assert reduction(3888, 2592, 0) == 1  # nothing said: full size


@pytest.mark.parametrize("size", [128, 256])
def test_reduced_decode_preprocesses_like_the_full_decode(photos, size):
    cfg = PrepareConfig(image_size=size)
    for name, rgb in photos.items():
        data = jpeg(rgb)
        full, reduced = decode_photo(data), decode_photo(data, needed=size)
        factor = reduction(WIDTH, HEIGHT, size)
        assert reduced.pixels.shape == (HEIGHT // factor, WIDTH // factor, 3) and factor > 1
        assert (reduced.height, reduced.width, reduced.scale) == (HEIGHT, WIDTH, factor)  # the photograph's size
        a, b = preprocess(full.pixels, cfg).astype(float), preprocess(reduced.pixels, cfg).astype(float)
        diff = np.abs(a - b)
        psnr = 10 * np.log10(255**2 / (diff**2).mean())
        assert diff.mean(axis=(0, 1)).max() <= MAX_MEAN_ABS_DIFF and psnr >= MIN_PSNR, (name, diff.mean(), psnr)
        box_full = np.array(fundus_box(full.pixels))
        box_reduced = np.array(fundus_box(reduced.pixels)) * factor
        assert np.abs(box_full - box_reduced).max() / HEIGHT * size <= MAX_BOX_OUTPUT_PX, name


def test_gradability_verdicts_agree_on_degraded_full_size_copies(photos):
    needed = decode_size(PrepareConfig())
    k = HEIGHT / 224  # degrade is tuned for 224 px photographs: blur scaled to this size
    kinds = {"original": lambda x: x, "blur": lambda x: cv2.GaussianBlur(x, (0, 0), 3.0 * k),
             "dark": lambda x: degrade(x, "dark"), "bright": lambda x: degrade(x, "bright"),
             "crop_corner": lambda x: degrade(x, "crop_corner")}
    for name, rgb in photos.items():
        for kind, make in kinds.items():
            data = jpeg(make(rgb))
            full, reduced = assess(decode_photo(data).pixels), assess_photo(decode_photo(data, needed=needed))
            assert full.reason == reduced.reason, (name, kind, full, reduced)
            assert reduced.diameter == pytest.approx(full.diameter, rel=0.02)  # in photograph pixels


def test_png_and_small_jpeg_are_decoded_in_full(aptos_dir):
    png = next((aptos_dir / "images").iterdir()).read_bytes()
    assert np.array_equal(decode_photo(png, needed=128).pixels, decode_photo(png).pixels)
    small = jpeg(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")))  # 224 px: nothing to reduce
    assert decode_photo(small, needed=128).pixels.shape == (224, 224, 3)


def test_exif_orientation_turns_the_reduced_decode_and_its_size(photos):
    exif = Image.Exif()
    exif[0x0112] = 6  # turned 90 degrees clockwise
    data = jpeg(photos["synthetic0"], exif=exif.tobytes())
    full, reduced = decode_photo(data), decode_photo(data, needed=256)
    assert full.pixels.shape == (WIDTH, HEIGHT, 3) and (full.height, full.width) == (WIDTH, HEIGHT)
    assert reduced.pixels.shape == (WIDTH // 2, HEIGHT // 2, 3) and (reduced.height, reduced.width) == (WIDTH, HEIGHT)
    assert np.abs(cv2.resize(full.pixels, (HEIGHT // 2, WIDTH // 2), interpolation=cv2.INTER_AREA).astype(int)
                  - reduced.pixels).mean() < 2


@pytest.mark.parametrize("mode", ["L", "CMYK"])
def test_grey_and_cmyk_jpegs_reduce_like_rgb(photos, mode):
    img = Image.fromarray(photos["synthetic4"]).convert(mode)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    full, reduced = decode_photo(buf.getvalue()), decode_photo(buf.getvalue(), needed=256)
    assert reduced.pixels.shape == (HEIGHT // 2, WIDTH // 2, 3) and reduced.pixels.dtype == np.uint8
    shrunk = cv2.resize(full.pixels, (WIDTH // 2, HEIGHT // 2), interpolation=cv2.INTER_AREA)
    assert np.abs(shrunk.astype(int) - reduced.pixels).mean() < 2


def test_limits_and_broken_files_hold_for_reduced_decodes(photos):
    data = jpeg(photos["aptos"])
    with pytest.raises(ImageError) as e:
        decode_photo(data, max_pixels=1_000_000, needed=128)  # checked on the header, reduced or not
    assert e.value.reason == "image too large: 1200x1600 = 1.9 MP > prepare.max_pixels 1.0 MP"
    with pytest.raises(ImageError) as e:
        decode_photo(data[: len(data) // 2], needed=128)
    assert e.value.reason == "truncated image"


def test_prepare_and_predict_rows_keep_the_photographs_size(photos, tmp_path):
    path = tmp_path / "big.jpg"
    path.write_bytes(jpeg(photos["synthetic0"]))
    record = {"order": 0, "id": "big", "grade": 0, "source": str(path)}
    cfg = PrepareConfig(image_size=128, min_image_side=1300)  # tiny is judged on the photograph, not the decode
    assert process_record(record, cfg)["reason"] == f"tiny image: {HEIGHT}x{WIDTH} < min_image_side 1300"
    row = process_record(record, PrepareConfig(image_size=128))
    assert (row["orig_height"], row["orig_width"], row["height"]) == (HEIGHT, WIDTH, 128)
    assert read_photo(record, 32, needed=128).pixels.shape == (HEIGHT // 4, WIDTH // 4, 3)
    rows = load_rows({"source": np.array([str(path)], dtype=object)}, {"image_size": 128})
    assert rows["gradable"][0] and rows["height"][0] == 128
    assert rows["quality_diameter"][0] == pytest.approx(HEIGHT, rel=0.03)  # in photograph pixels
