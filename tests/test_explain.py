"""Grad-CAM heatmaps: the layer they read, their shape and scale, which images are chosen, overlays on disk."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import helpers
from aptos_ray.config import Config
from aptos_ray.figures import overlay
from aptos_ray.infer.explain import GROUPS, Explainer, last_conv_layer, select, write_explanations
from aptos_ray.train.checkpoint import Checkpoint
from aptos_ray.infer.grader import Grader
from aptos_ray.model.factory import create_model

SIZE = 64


def tiny_grader(head: str, size: int = SIZE) -> Grader:
    """An untrained timm test_efficientnet as a Grader (weights seeded: the maps are reproducible)."""
    torch.manual_seed(0)
    cfg = Config()
    cfg.model = helpers.tiny_model(head=head)
    cfg.data.image_size = size
    model = create_model(cfg.model, load_pretrained=False)
    return Grader(Checkpoint("memory", cfg, model.state_dict(), None, 0, {}))


@pytest.fixture(scope="module")
def photos(aptos_dir) -> np.ndarray:
    ids = pd.read_csv(aptos_dir / "labels.csv").groupby("diagnosis").head(1)["id_code"]
    return np.stack([np.asarray(Image.open(aptos_dir / "images" / f"{i}.png").convert("RGB").resize((96, 96)))
                     for i in ids])


def test_the_layer_is_the_last_spatial_feature_map():
    grader = tiny_grader("regression")
    layer = last_conv_layer(grader.model, SIZE)
    assert layer is grader.model.bn2  # timm EfficientNet: conv_head + BN + activation, before pooling
    shapes = []
    hook = layer.register_forward_hook(lambda _m, _i, out: shapes.append(out.shape))
    grader.model(torch.zeros(1, 3, SIZE, SIZE))
    hook.remove()
    assert len(shapes[0]) == 4 and min(shapes[0][-2:]) > 1


@pytest.mark.parametrize("head", ["regression", "classification"])
def test_heatmaps_have_the_image_size_and_unit_scale(head, photos):
    explainer = Explainer(tiny_grader(head))
    maps = explainer.heatmaps(photos)
    assert maps.shape == photos.shape[:3] and maps.dtype == np.float32
    assert np.isfinite(maps).all() and maps.min() >= 0.0 and maps.max() <= 1.0
    peaks = maps.reshape(len(maps), -1).max(axis=1)
    # Each map is scaled to its own maximum (a map may be all zero where no feature raised the output).
    assert np.all((peaks > 0.99) | (peaks == 0.0)) and (peaks > 0.99).any()
    assert maps.reshape(len(maps), -1).std(axis=1).max() > 0.05  # not flat: it points somewhere
    np.testing.assert_allclose(explainer.heatmaps(photos[:2]), maps[:2], atol=1e-5)  # deterministic
    assert explainer.heatmaps(photos[:0]).shape == (0, 96, 96)


def test_the_heatmap_follows_what_raises_the_score():
    """A model that reads the score from one quadrant: Grad-CAM must light that quadrant up."""
    size = 256  # an 8 x 8 feature map: fine enough to tell quadrants apart
    grader = tiny_grader("regression", size)
    with torch.no_grad():
        for p in grader.model.parameters():
            p.mul_(0)  # blank the network ...
    layer = last_conv_layer(grader.model, size)

    def top_left_only(_module, _inputs, out):  # ... and let only the top-left features count
        mask = torch.zeros_like(out)
        mask[..., : out.shape[-2] // 2, : out.shape[-1] // 2] = 1
        return out * 0 + mask * 1.0

    hook = layer.register_forward_hook(top_left_only)
    grader.model.get_classifier().weight.data.fill_(1.0)
    maps = Explainer(grader).heatmaps(np.full((1, size, size, 3), 100, np.uint8))
    hook.remove()
    half = size // 2  # upsampled bilinearly: a soft edge one feature cell wide
    assert maps[0, 0, 0] > 0.99 and maps[0, -1, -1] < 0.01
    assert maps[0, :half, :half].mean() > 0.8 > 0.2 > maps[0, half:, half:].mean()


def predictions_frame() -> pd.DataFrame:
    return pd.DataFrame({
        "id": [f"img{i}" for i in range(8)],
        "grade": [0, 0, 1, 2, 3, 4, 4, -1],
        "predicted": [0, 2, 1, 2, 3, 2, 4, 3],
        "score": [0.1, 1.6, 1.3, 2.2, 3.0, 1.9, 3.9, 2.8],
        "gradable": [True] * 7 + [False],
    })


def test_selection_of_images_to_explain():
    chosen = select(predictions_frame(), 2)
    assert set(chosen["group"]) == set(GROUPS)
    groups = {g: chosen[chosen["group"] == g]["id"].tolist() for g in GROUPS}
    assert groups["confident_referable"] == ["img6", "img4"]  # highest scores among predicted >= 2
    assert groups["uncertain"] == ["img1", "img2"]  # 0.1 and 0.2 from a cut point (1.5); the others 0.3+
    assert groups["miss"] == ["img5", "img1"]  # |2-4| = 2 first; img7 has no label: never a miss
    assert select(predictions_frame(), 0).empty
    assert len(select(predictions_frame(), 100)) == 6 + 8 + 2  # all predicted >= 2, all, all misses


def test_overlays_are_written(photos, tmp_path):
    frame = predictions_frame().head(len(photos))
    chosen = select(frame, 1)
    images = np.stack([photos[int(i[3:]) % len(photos)] for i in chosen["id"]])
    maps = Explainer(tiny_grader("regression")).heatmaps(images)
    index = write_explanations(str(tmp_path), chosen, images, maps)
    assert len(index) == len(chosen) == 3
    for row in index.itertuples():
        png = Image.open(tmp_path / row.file)
        assert png.size == (96, 96) and png.mode == "RGB"
        assert row.file.startswith(f"explain/{row.group}_")
    assert pd.read_csv(tmp_path / "explain" / "index.csv")["file"].tolist() == index["file"].tolist()
    blended = overlay(images[0], maps[0])
    frame_pixels = images[0].max(axis=2) < 10
    assert (blended[frame_pixels] == images[0][frame_pixels]).all()  # the black frame stays black
    assert not (blended[~frame_pixels] == images[0][~frame_pixels]).all()
