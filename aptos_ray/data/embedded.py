"""The embedded default: with no dataset at ``data.dataset``, the synthetic fundus set is generated and
prepared on first use, so every job runs on a fresh checkout with no data."""

from __future__ import annotations

import dataclasses

from aptos_ray import storage
from aptos_ray.config import Config, PrepareConfig
from aptos_ray.data.format import MANIFEST, read_manifest
from aptos_ray.errors import DataError, MissingFileError


def uses_embedded_default(cfg: Config) -> bool:
    """True when the config trains on the synthetic dataset that it also knows how to build."""
    same = lambda a, b: storage.absolute(a) == storage.absolute(b)  # noqa: E731  (tune makes paths absolute)
    return same(cfg.prepare.input, cfg.synthetic.output) and same(cfg.prepare.output, cfg.data.dataset)


def check_validation_split(cfg: Config, manifest: dict) -> None:
    """Every epoch is scored on the validation split: refuse a dataset without one before any epoch."""
    if not sum(int(n) for n in manifest.get("counts", {}).get("val", {}).values()):
        raise DataError(f"{cfg.data.dataset} has no validation images (prepared with prepare.val_fraction=0?): "
                        "prepare it again with --prepare.val_fraction > 0")


def ensure_dataset(cfg: Config) -> dict:
    """The prepared dataset's manifest; the embedded default is generated on first use."""
    manifest_path = storage.join(cfg.data.dataset, MANIFEST)
    if not storage.exists(manifest_path):
        if not uses_embedded_default(cfg):
            raise MissingFileError(
                f"{manifest_path} not found: prepare the dataset first, e.g. `python jobs/prepare.py "
                f"--prepare.input=<raw data> --prepare.output={cfg.data.dataset}`"
            )
        build_default_dataset(cfg)
    return read_manifest(cfg.data.dataset)


def build_default_dataset(cfg: Config) -> None:
    """Synthetic fundus photos -> prepared dataset (about a minute for the default 600 images)."""
    # Imported here: prepare pulls in Ray Data, which a run on an existing dataset never needs.
    from aptos_ray.data.prepare import prepare
    from aptos_ray.data.synthetic import generate

    print(f"No dataset at {cfg.data.dataset}: generating the embedded synthetic default "
          f"({cfg.synthetic.num_images} images) and preparing it.")
    generate(cfg.synthetic)
    prepare(cfg)


# What decides how a prepared image looks; the split, quality and encoding settings do not.
LOOK_KEYS = ("crop_border", "circle_mask", "ben_graham", "ben_graham_sigma", "normalise", "image_size")


def dataset_preprocessing(manifest: dict) -> dict | None:
    """How a prepared dataset's images were made: its manifest's prepare settings (``PrepareConfig``
    keys only), which predict repeats on new photographs; None when the manifest does not say."""
    saved = manifest.get("config")
    if not isinstance(saved, dict):
        return None
    names = {f.name for f in dataclasses.fields(PrepareConfig)}
    return {k: v for k, v in saved.items() if k in names}


def record_preprocessing(cfg: Config, manifest: dict) -> None:
    """``cfg.prepare`` := the preprocessing the dataset really had, so that the run's config.yaml says
    what its images were (the ``prepare`` keys given to train only build a missing default dataset)."""
    cfg.prepare = dataclasses.replace(cfg.prepare, **(dataset_preprocessing(manifest) or {}))
