"""The device-side data path: batched per-image augmentation and the prefetching batch feed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from aptos_ray.train.augment import CAMERA, GradeTransforms, prefetch_to_device

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture(scope="module")
def fundus(aptos_dir) -> np.ndarray:
    """Real APTOS photographs at their stored 224 px."""
    files = sorted((aptos_dir / "images").glob("*.png"))[:8]
    return np.stack([np.asarray(Image.open(f).convert("RGB").resize((224, 224))) for f in files])


def denormalised(x: torch.Tensor) -> torch.Tensor:
    return x * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)


def test_each_image_draws_its_own_parameters(fundus):
    torch.manual_seed(0)
    out = GradeTransforms(128, MEAN, STD).train(np.repeat(fundus[:1], 16, axis=0))
    assert out.shape == (16, 3, 128, 128) and out.dtype == torch.float32
    differences = [(out[i] - out[j]).abs().mean() for i in range(16) for j in range(i)]
    assert min(differences) > 0.05  # no two copies of the same image came out alike


def test_numpy_and_tensor_inputs_give_the_same_batch(fundus):
    tf = GradeTransforms(96, MEAN, STD)
    torch.manual_seed(1)
    a = tf.train(fundus)
    torch.manual_seed(1)
    b = tf.train(torch.from_numpy(fundus))
    assert torch.equal(a, b)


def test_eval_matches_torchvision_resize_and_normalise(fundus):
    """Validation and prediction: the same resize as before (antialiased bilinear), no randomness."""
    expected = v2.Resize((160, 160), antialias=True)(torch.from_numpy(fundus).permute(0, 3, 1, 2)).float() / 255
    got = denormalised(GradeTransforms(160, MEAN, STD, augment=False).train(fundus))
    assert (got - expected).abs().max() < 1.5 / 255  # torchvision rounds to uint8 in between
    same = GradeTransforms(224, MEAN, STD).eval(fundus)  # stored size = model size: no resampling
    assert torch.allclose(denormalised(same), torch.from_numpy(fundus).permute(0, 3, 1, 2) / 255, atol=1e-5)


def test_geometry_is_a_crop_flip_rotation_of_the_image():
    """With zoom, rotation and colour off, flips alone map the image exactly onto its mirror images."""
    torch.manual_seed(0)
    image = np.random.default_rng(0).integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)
    tf = GradeTransforms(32, (0, 0, 0), (1, 1, 1), scale=(1, 1), ratio=(1, 1), degrees=0, brightness=0, contrast=0)
    out = tf.train(np.repeat(image, 64, axis=0)) * 255
    x = torch.from_numpy(image).permute(0, 3, 1, 2).float()
    views = [x, x.flip(3), x.flip(2), x.flip(2).flip(3)]
    matched = [min(range(4), key=lambda k: (o - views[k][0]).abs().max()) for o in out]
    assert all((o - views[k][0]).abs().max() < 1e-3 for o, k in zip(out, matched))
    assert set(matched) == {0, 1, 2, 3}  # every flip combination drawn among 64 images


def test_rotation_turns_a_centred_disc_about_its_centre():
    """A disc with a bright spot off its centre: any rotation keeps the disc's brightness and moves
    the spot along its circle (scale fixed, colour off)."""
    yy, xx = np.mgrid[:96, :96] - 47.5
    image = np.zeros((96, 96, 3), dtype=np.uint8)
    image[np.hypot(xx, yy) < 40] = 100
    image[np.hypot(xx - 25, yy) < 5] = 255  # the spot, 25 px right of the centre
    tf = GradeTransforms(96, (0, 0, 0), (1, 1, 1), scale=(1, 1), ratio=(1, 1), brightness=0, contrast=0)
    torch.manual_seed(0)
    out = tf.train(np.repeat(image[None], 16, axis=0))
    assert torch.allclose(out.mean((1, 2, 3)), torch.tensor(image.mean() / 255).float().expand(16), rtol=0.01)
    spots = [np.unravel_index(int(o[0].argmax()), o[0].shape) for o in out]
    radii = [np.hypot(x - 47.5, y - 47.5) for y, x in spots]
    assert all(20 < r < 30 for r in radii)
    assert len({(y // 12, x // 12) for y, x in spots}) > 4  # at many angles, not one


def test_augmented_statistics_match_the_per_image_torchvision_path(fundus):
    """The batched path replaces a per-image torchvision v2 pipeline with the same ranges: the
    augmented pixel statistics agree (mean and spread per channel, over many draws)."""
    reference = v2.Compose([
        v2.RandomResizedCrop(128, scale=(0.85, 1.0), ratio=(0.9, 1.1), antialias=True),
        v2.RandomHorizontalFlip(), v2.RandomVerticalFlip(), v2.RandomRotation(180),
        v2.ColorJitter(brightness=0.2, contrast=0.2),
    ])
    batch = np.concatenate([fundus] * 8)
    torch.manual_seed(0)
    old = torch.stack([reference(img) for img in torch.from_numpy(batch).permute(0, 3, 1, 2)]).float() / 255
    new = denormalised(GradeTransforms(128, MEAN, STD).train(batch))
    assert torch.allclose(new.mean((0, 2, 3)), old.mean((0, 2, 3)), atol=0.01)
    assert torch.allclose(new.std((0, 2, 3)), old.std((0, 2, 3)), rtol=0.05)


def test_large_stored_images_are_shrunk_with_antialiasing():
    """Thin stripes (a 1-pixel period) average to grey, not to an aliased pattern."""
    stripes = np.zeros((2, 512, 512, 3), dtype=np.uint8)
    stripes[:, :, ::2] = 255
    tf = GradeTransforms(64, (0, 0, 0), (1, 1, 1), scale=(1, 1), ratio=(1, 1), degrees=0, brightness=0, contrast=0)
    out = tf.train(stripes)
    assert (out[..., 8:-8, 8:-8] - 0.5).abs().max() < 0.05


@pytest.mark.parametrize("depth", [0, 2])
def test_prefetch_delivers_every_batch_in_order(depth):
    batches = [(np.full((4, 8, 8, 3), i, dtype=np.uint8), np.arange(4) + i) for i in range(7)]
    got = list(prefetch_to_device(iter(batches), torch.device("cpu"), depth))
    assert [int(x[0, 0, 0, 0]) for x, _, _ in got] == list(range(7))
    assert all(torch.equal(y, torch.from_numpy(g)) and y.dtype == torch.int64 for _, y, g in got)


def test_prefetch_raises_the_readers_error_in_the_training_thread():
    def failing():
        yield np.zeros((2, 4, 4, 3), dtype=np.uint8), np.zeros(2, dtype=np.int64)
        raise OSError("parquet read failed")

    feed = prefetch_to_device(failing(), torch.device("cpu"), depth=2)
    next(feed)
    with pytest.raises(OSError, match="parquet read failed"):
        next(feed)


def test_camera_colour_jitter_varies_white_balance_and_keeps_black(fundus):
    """data.colour=camera: the same photograph comes out with many colour casts (the fundus's
    chromaticity spread far wider than brightness and contrast alone give), black stays black
    before the contrast blend, and every pixel stays in [0, 255]."""
    x = torch.from_numpy(np.repeat(fundus[:1], 64, axis=0)).permute(0, 3, 1, 2).float()
    x[:, :, :20, :20] = 0  # a black corner (the photographs' backgrounds are nearly, not exactly, 0)
    inside = torch.from_numpy(fundus[0].max(axis=2) > 40)

    def shares(tf: GradeTransforms) -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(0)
        out = tf.random_colour(x.clone())
        rgb = out[:, :, inside].mean(2)
        return rgb / rgb.sum(1, keepdim=True), out

    exposure, _ = shares(GradeTransforms(224, MEAN, STD))
    camera, out = shares(GradeTransforms(224, MEAN, STD, **CAMERA))
    # brightness and contrast alone barely move green's share (contrast blends towards grey, which
    # moves red's and blue's); per-channel gains move every channel's
    assert camera[:, 1].std() > 3 * exposure[:, 1].std()
    red_green = [(c[:, 0] / c[:, 1]).std() for c in (exposure, camera)]
    assert red_green[1] > 2 * red_green[0]
    assert out.min() >= 0 and out.max() <= 255
    _, camera_only = shares(GradeTransforms(224, MEAN, STD, brightness=0, contrast=0, **CAMERA))
    assert (camera_only[:, :, :20, :20] == 0).all() and camera_only.std(0).mean() > 1
