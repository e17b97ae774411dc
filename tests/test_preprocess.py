"""preprocess.py: pure array functions, on small synthetic fundus images."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from PIL import Image

from aptos_ray.config import ConfigError, PrepareConfig, parse_args
from aptos_ray.infer.inputs import preprocessing_differences
from aptos_ray.data.preprocess import (
    ImageError,
    ben_graham,
    circle_mask,
    clahe_green,
    crop_fundus,
    grey_world,
    load_image,
    preprocess,
    resize_pad,
    to_rgb_uint8,
)


def fundus(h: int = 120, w: int = 160, radius: int = 50, colour=(200, 90, 40)) -> np.ndarray:
    """A bright disc with a 'vessel' on a black frame, centred."""
    arr = np.zeros((h, w, 3), np.uint8)
    cv2.circle(arr, (w // 2, h // 2), radius, colour, -1)
    cv2.line(arr, (w // 2 - radius // 2, h // 2), (w // 2 + radius // 2, h // 2 + 5), (120, 20, 20), 2)
    return arr


def bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return rows[0], rows[-1] + 1, cols[0], cols[-1] + 1


# ---------------------------------------------------------------- to_rgb_uint8


def test_to_rgb_grey_2d_and_single_channel():
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4)
    for arr in (grey, grey[:, :, None]):
        out = to_rgb_uint8(arr)
        assert out.shape == (3, 4, 3) and out.dtype == np.uint8
        assert (out[:, :, 0] == grey).all() and (out[:, :, 2] == grey).all()


def test_to_rgb_alpha_composites_on_black():
    rgba = np.full((2, 2, 4), 200, np.uint8)
    rgba[0, 0, 3] = 0  # transparent
    rgba[1, 1, 3] = 255
    out = to_rgb_uint8(rgba)
    assert out.shape == (2, 2, 3)
    assert (out[0, 0] == 0).all() and (out[1, 1] == 200).all()
    grey_alpha = np.stack([np.full((2, 2), 100, np.uint8), np.full((2, 2), 255, np.uint8)], axis=2)
    assert (to_rgb_uint8(grey_alpha) == 100).all()


def test_to_rgb_16bit_bool_float():
    assert (to_rgb_uint8(np.full((2, 2), 65535, np.uint16)) == 255).all()
    assert (to_rgb_uint8(np.full((2, 2), 257 * 100, np.uint16)) == 100).all()
    assert (to_rgb_uint8(np.full((2, 2), 257 * 100, np.int32)) == 100).all()  # PIL mode "I"
    assert (to_rgb_uint8(np.ones((2, 2), bool)) == 255).all()
    assert (to_rgb_uint8(np.full((2, 2, 3), 0.5, np.float32)) == 128).all()


def test_to_rgb_rejects_nonsense_shapes():
    with pytest.raises(ImageError):
        to_rgb_uint8(np.zeros((2, 2, 5), np.uint8))
    with pytest.raises(ImageError):
        to_rgb_uint8(np.zeros((0, 4, 3), np.uint8))


# ---------------------------------------------------------------- load_image


@pytest.mark.parametrize(
    "mode, value",
    [("RGB", (200, 90, 40)), ("L", 150), ("I;16", 257 * 150), ("P", None), ("RGBA", (200, 90, 40, 255)),
     ("CMYK", None), ("LA", (150, 255))],
)
def test_load_image_modes(tmp_path, mode, value):
    rgb = Image.fromarray(fundus())
    if mode == "P":
        img = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    elif mode == "CMYK":
        img = rgb.convert("CMYK")
    elif mode == "I;16":
        img = Image.fromarray(np.where(np.asarray(rgb.convert("L")) > 0, value, 0).astype(np.uint16))
    else:
        img = rgb.convert(mode)
    path = tmp_path / ("x.jpg" if mode == "CMYK" else "x.png")
    img.save(path, **({"quality": 95} if mode == "CMYK" else {}))
    assert Image.open(path).mode == mode
    out = load_image(path)
    assert out.shape == (120, 160, 3) and out.dtype == np.uint8
    assert out[:5, :5].max() <= 10  # black frame stays black
    centre = out[60, 40].astype(int)  # inside the disc, off the vessel
    if mode in ("L", "I;16", "LA"):
        grey = 150 if mode == "I;16" else np.asarray(rgb.convert("L"))[60, 40]
        assert abs(centre - grey).max() <= 1 and centre[0] == centre[1] == centre[2]
    else:
        assert abs(centre - np.array([200, 90, 40])).max() <= 12  # palette / CMYK JPEG are lossy


def test_load_image_rgba_transparency_is_black(tmp_path):
    arr = np.dstack([fundus(), np.zeros((120, 160), np.uint8)])  # fully transparent
    Image.fromarray(arr, "RGBA").save(tmp_path / "t.png")
    assert load_image(tmp_path / "t.png").max() == 0


def test_load_image_errors(tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(fundus()).save(good)
    (tmp_path / "zero.png").write_bytes(b"")
    (tmp_path / "trunc.png").write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    (tmp_path / "text.png").write_text("id_code,diagnosis\nnot,an image\n")
    cases = {"zero.png": "zero-byte file", "trunc.png": "truncated image", "text.png": "not an image",
             "missing.png": "missing file"}
    for name, reason in cases.items():
        with pytest.raises(ImageError) as e:
            load_image(tmp_path / name)
        assert e.value.reason == reason, name
    with pytest.raises(ImageError) as e:
        load_image(tmp_path)  # a directory
    assert "unreadable" in e.value.reason


# ---------------------------------------------------------------- crop_fundus


def test_crop_fundus_crops_to_the_disc():
    arr = fundus(120, 160, 50)
    out = crop_fundus(arr)
    assert abs(out.shape[0] - 101) <= 3 and abs(out.shape[1] - 101) <= 3
    assert (out[out.shape[0] // 2, out.shape[1] // 2] == arr[60, 80]).all()


def test_crop_fundus_ignores_noise_in_the_border():
    arr = fundus(120, 160, 50)
    arr[2, 3] = 255  # a hot pixel
    arr[110:113, 5:12] = 255  # a small burnt-in label
    out = crop_fundus(arr)
    assert out.shape[0] <= 105 and out.shape[1] <= 105


def test_crop_fundus_grey_frame():
    arr = fundus(120, 160, 50)
    arr[arr.max(axis=2) == 0] = 25  # a camera that leaves a dark grey frame, not black
    noisy = np.clip(arr.astype(int) + np.random.default_rng(0).integers(-4, 5, arr.shape), 0, 255).astype(np.uint8)
    out = crop_fundus(noisy)
    assert abs(out.shape[0] - 101) <= 3 and abs(out.shape[1] - 101) <= 3


@pytest.mark.parametrize("value", [0, 5])
def test_crop_fundus_all_black_or_dark_is_unchanged(value):
    arr = np.full((50, 70, 3), value, np.uint8)
    assert crop_fundus(arr) is arr


def test_crop_fundus_no_border_and_tiny_speck_are_unchanged():
    arr = np.full((50, 70, 3), 120, np.uint8)
    assert crop_fundus(arr).shape == arr.shape
    speck = np.zeros((100, 100, 3), np.uint8)
    speck[40:43, 40:43] = 255  # 3% of a side: not a fundus, don't magnify it
    assert crop_fundus(speck).shape == speck.shape


def test_crop_fundus_disc_cut_at_top_and_bottom():
    arr = np.zeros((100, 200, 3), np.uint8)
    cv2.circle(arr, (100, 50), 60, (180, 80, 30), -1)  # taller than the frame
    out = crop_fundus(arr)
    assert out.shape[0] == 100 and abs(out.shape[1] - 121) <= 3


# ---------------------------------------------------------------- circle_mask


def test_circle_mask_blanks_outside_only():
    arr = np.full((64, 64, 3), 200, np.uint8)
    out = circle_mask(arr)
    assert (out[0, 0] == 0).all() and (out[63, 63] == 0).all() and (out[0, 63] == 0).all()
    assert (out[32, 32] == 200).all() and (out[32, 1] == 200).all() and (out[1, 32] == 200).all()
    area = np.count_nonzero(out[:, :, 0]) / 64**2
    assert abs(area - np.pi / 4) < 0.03
    grey = circle_mask(arr, 0.5, fill=128)
    assert (grey[32, 2] == 128).all() and (grey[32, 32] == 200).all()


@pytest.mark.parametrize("layout", ["c", "fortran", "cropped view", "flipped", "grey"])
def test_circle_mask_keeps_the_same_pixels_whatever_the_memory_layout(layout):
    """The copy runs in OpenCV, which takes C-ordered arrays only: a view or a Fortran array
    handed in must come out as the same pixels, not an OpenCV error."""
    base = np.random.default_rng(0).integers(0, 256, (70, 90, 3), dtype=np.uint8)
    arr = {"c": base, "fortran": np.asfortranarray(base), "cropped view": base[5:60, 10:80],
           "flipped": base[::-1, :, ::-1], "grey": base[..., 1]}[layout]
    h, w = arr.shape[:2]
    distance = np.hypot(np.arange(h)[:, None] - h // 2, np.arange(w)[None, :] - w // 2)
    inside, outside = distance < min(h, w) / 2 - 1.5, distance > min(h, w) / 2 + 1.5  # the rim's raster aside
    out = circle_mask(arr, fill=7)
    assert out.shape == arr.shape and out.dtype == np.uint8
    assert (out[inside] == arr[inside]).all() and (out[outside] == 7).all()


def test_circle_mask_non_square_uses_inscribed_circle():
    out = circle_mask(np.full((40, 80, 3), 200, np.uint8))
    assert (out[20, 5] == 0).all() and (out[20, 40] == 200).all() and (out[20, 21] == 200).all()


# ---------------------------------------------------------------- resize_pad


def test_resize_pad_keeps_aspect_and_pads_black():
    arr = np.full((50, 100, 3), 200, np.uint8)
    out = resize_pad(arr, 64)
    assert out.shape == (64, 64, 3)
    top, bottom, left, right = bbox(out[:, :, 0] > 0)
    assert (left, right) == (0, 64) and (top, bottom) == (16, 48)
    assert out[:16].max() == 0 and out[48:].max() == 0


def test_resize_pad_never_stretches_the_disc():
    arr = np.zeros((100, 200, 3), np.uint8)
    cv2.circle(arr, (100, 50), 40, (200, 200, 200), -1)
    out = resize_pad(arr, 128)
    top, bottom, left, right = bbox(out[:, :, 0] > 100)
    assert abs((bottom - top) - (right - left)) <= 1  # still round


def test_resize_pad_downscale_averages_upscale_works():
    checker = (np.indices((64, 64)).sum(0) % 2 * 255).astype(np.uint8)
    out = resize_pad(np.dstack([checker] * 3), 16)
    assert out.shape == (16, 16, 3) and abs(int(out.mean()) - 127) <= 2 and out.std() < 2  # INTER_AREA
    small = resize_pad(np.full((28, 28, 3), 90, np.uint8), 64)
    assert small.shape == (64, 64, 3) and (small == 90).all()


# ---------------------------------------------------------------- ben_graham


def test_ben_graham_flat_image_is_grey_and_edges_are_enhanced():
    flat = np.full((64, 64, 3), 77, np.uint8)
    assert (ben_graham(flat, 3) == 128).all()
    step = np.zeros((64, 64, 3), np.uint8)
    step[:, 32:] = 100
    out = ben_graham(step, 4)
    assert out.dtype == np.uint8
    assert out[32, 33, 0] == 255 and out[32, 30, 0] == 0  # saturated, not wrapped around
    assert out[32, 2, 0] == 128 and out[32, 61, 0] == 128  # far from the edge: back to neutral


# ---------------------------------------------------------------- grey world, CLAHE of the green channel


def fundus_means(arr: np.ndarray) -> np.ndarray:
    return arr[arr.max(axis=2) > 10].mean(axis=0)


def test_grey_world_cancels_a_colour_cast_and_keeps_brightness():
    arr = fundus(colour=(200, 90, 40))
    out = grey_world(arr)
    means = fundus_means(out)
    assert means.max() - means.min() < 2  # the channels of the fundus are balanced
    assert abs(means.mean() - fundus_means(arr).mean()) < 2  # as bright as before
    assert (out[0, 0] == 0).all()  # the black frame is not averaged in, and stays black
    # another camera's white balance (gains that keep the mean brightness: grey world does not undo exposure)
    cast = (arr * np.array([0.8, 1.2, 1.6])).clip(0, 255).astype(np.uint8)
    assert np.abs(grey_world(cast).astype(int) - out.astype(int)).max() <= 3


def test_clahe_green_is_the_green_channel_with_its_local_contrast_raised(aptos_dir):
    photo = preprocess(load_image(min((aptos_dir / "images").glob("*.png"))), PrepareConfig(image_size=128))
    out = clahe_green(photo)
    assert (out[:, :, 0] == out[:, :, 1]).all() and (out[:, :, 1] == out[:, :, 2]).all()
    fundus_pixels = photo.max(axis=2) > 10
    for exposure in (1.0, 0.5):  # as photographed, and at half the exposure
        green = (photo * exposure).astype(np.uint8)
        assert clahe_green(green)[:, :, 1][fundus_pixels].std() > 1.5 * green[:, :, 1][fundus_pixels].std()


@pytest.mark.parametrize("method", ["ben_graham", "grey_world", "clahe_green"])
def test_normalise_is_applied_by_preprocess_and_reported_as_a_difference(method):
    arr = fundus()
    out = preprocess(arr, PrepareConfig(image_size=96, normalise=method))
    assert not np.array_equal(out, preprocess(arr, PrepareConfig(image_size=96)))
    trained = PrepareConfig(image_size=96, normalise=method)
    assert preprocessing_differences({"image_size": 96}, trained) == [f"normalise=none (training: {method})"]
    assert preprocessing_differences({"image_size": 96, "normalise": method}, trained) == []


def test_the_older_ben_graham_switch_is_normalise_ben_graham():
    arr = fundus()
    old = preprocess(arr, PrepareConfig(image_size=96, ben_graham=True))
    assert np.array_equal(old, preprocess(arr, PrepareConfig(image_size=96, normalise="ben_graham")))
    assert preprocessing_differences({"ben_graham": True}, PrepareConfig(normalise="ben_graham")) == []
    with pytest.raises(ConfigError, match="prepare.ben_graham=true is prepare.normalise=ben_graham"):
        parse_args(["--prepare.ben_graham=true", "--prepare.normalise=clahe_green"])


# ---------------------------------------------------------------- preprocess


def test_preprocess_composes_per_config():
    arr = fundus(120, 200, 50)
    out = preprocess(arr, PrepareConfig(image_size=96))
    assert out.shape == (96, 96, 3) and out.dtype == np.uint8
    top, bottom, left, right = bbox(out[:, :, 0] > 30)
    assert top <= 2 and left <= 2 and bottom >= 94 and right >= 94  # cropped: the disc fills the square
    assert out[0, 0].max() == 0 and out[95, 95].max() == 0  # circle mask

    plain = preprocess(arr, PrepareConfig(image_size=96, crop_border=False, circle_mask=False))
    top, bottom, left, right = bbox(plain[:, :, 0] > 30)
    assert right - left < 60  # not cropped: the disc stays small within the frame

    bg = preprocess(arr, PrepareConfig(image_size=96, ben_graham=True))
    assert bg[0, 0].tolist() == [128, 128, 128] and bg[48, 2].tolist() == [128, 128, 128]
    assert bg[48, 48].tolist() != [128, 128, 128]  # the vessel survives


def test_preprocess_accepts_grey_and_tiny_arrays():
    out = preprocess(np.full((28, 28), 90, np.uint8), PrepareConfig(image_size=32))
    assert out.shape == (32, 32, 3)
