"""A camera shift built from the shared APTOS images (issue 18): hold out the quartile of photographs
furthest from the rest in exposure or colour, train on the other three quartiles, grade the held-out one.

    darkest : the quarter with the lowest mean fundus luminance (under-exposed cameras)
    colour  : the quarter whose mean fundus chromaticity (r, g, b) / (r + g + b) is furthest from the
              median one (a different sensor / white balance)
    random  : a random quarter, the in-distribution control at the same training size

Measured on the prepared (cropped, masked) images: the fundus is every pixel brighter than 10. Each
shift is written as a prepared dataset (train / val from the other quartiles, 85 / 15, stratified and
seeded; test = the held-out quartile) beside the benchmark's other outputs, never into the repo.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from aptos_ray.data.folds import pooled_rows
from aptos_ray.data.format import SCHEMA, decode_image, read_manifest
from aptos_ray.data.splits import split_units

SHIFTS = ("darkest", "colour", "random")
GRAY = np.array([0.299, 0.587, 0.114])


def fundus_colour(image: np.ndarray) -> tuple[float, np.ndarray]:
    """(mean luminance, mean chromaticity) of the fundus pixels of one uint8 RGB image."""
    pixels = image.reshape(-1, 3).astype(np.float64)
    fundus = pixels[pixels.max(axis=1) > 10]
    if len(fundus) == 0:
        return 0.0, np.full(3, 1 / 3)
    mean = fundus.mean(axis=0)
    return float(mean @ GRAY), mean / max(mean.sum(), 1e-9)


def held_out(table: pa.Table, encoding: str, shift: str, seed: int) -> np.ndarray:
    """Boolean mask of the held-out quarter of ``table``'s rows."""
    n = table.num_rows
    if shift == "random":
        return np.isin(np.arange(n), np.random.default_rng(seed).permutation(n)[: n // 4])
    stats = [fundus_colour(decode_image(d, int(h), int(w), encoding)) for d, h, w in
             zip(table.column("image").to_pylist(), table.column("height").to_pylist(), table.column("width").to_pylist())]
    if shift == "darkest":
        key = np.array([-s[0] for s in stats])  # highest key = darkest
    elif shift == "colour":
        chroma = np.array([s[1] for s in stats])
        key = np.linalg.norm(chroma - np.median(chroma, axis=0), axis=1)
    else:
        raise ValueError(f"shift must be one of {SHIFTS}, got {shift!r}")
    return key >= np.quantile(key, 0.75)


def shifted_dataset(dataset: Path, shift: str, out: Path, seed: int = 0, chosen_on: Path | None = None) -> Path:
    """A prepared dataset whose test split is the held-out quarter (``shift``) of ``dataset``.

    ``chosen_on``: another preparation of the same images (e.g. without a normalisation) on which the
    quarter is chosen, so that every normalisation holds out the same photographs: chosen on a
    normalised preparation, "darkest" would mean something else.
    """
    if (out / "manifest.json").is_file():
        return out
    manifest = read_manifest(str(dataset))
    table = pooled_rows(str(dataset), SCHEMA.names)
    if chosen_on is None:
        test = held_out(table, manifest.get("encoding", "raw"), shift, seed)
    else:
        reference = pooled_rows(str(chosen_on), SCHEMA.names)
        mask = held_out(reference, read_manifest(str(chosen_on)).get("encoding", "raw"), shift, seed)
        ids = set(np.asarray(reference.column("id").to_pylist(), dtype=object)[mask])
        test = np.array([i in ids for i in table.column("id").to_pylist()])
    grades = table.column("grade").to_numpy(zero_copy_only=False).astype(int)
    rest = np.flatnonzero(~test)
    splits = np.array(["test"] * table.num_rows, dtype=object)
    splits[rest] = split_units(grades[rest], 0.15, 0.0, seed)
    counts = {}
    for split in ("train", "val", "test"):
        rows = table.filter(pa.array(splits == split))
        rows = rows.set_column(rows.schema.get_field_index("split"), "split",
                               pa.array([split] * rows.num_rows, pa.string()))
        (out / split).mkdir(parents=True, exist_ok=True)
        pq.write_table(rows.cast(SCHEMA), out / split / "part-0.parquet")
        values, numbers = np.unique(rows.column("grade").to_numpy(zero_copy_only=False), return_counts=True)
        counts[split] = {str(int(g)): int(c) for g, c in zip(values, numbers)}
    shifted = {**manifest, "counts": counts, "shift": {"kind": shift, "seed": seed, "from": str(dataset.resolve()),
                                                       "held_out": int(test.sum()),
                                                       "chosen_on": str(chosen_on.resolve()) if chosen_on else None}}
    (out / "manifest.json").write_text(json.dumps(shifted, indent=1))
    return out


def describe(dataset: Path) -> str:
    """Mean luminance of the test (held-out) split against the training split, for the table."""
    manifest = read_manifest(str(dataset))
    parts = []
    for split in ("train", "test"):
        t = pq.read_table(dataset / split, columns=["image", "height", "width"])
        lum = [fundus_colour(decode_image(d, int(h), int(w), manifest.get("encoding", "raw")))[0] for d, h, w in
               zip(t.column("image").to_pylist(), t.column("height").to_pylist(), t.column("width").to_pylist())]
        parts.append(f"{split} luminance {np.mean(lum):.0f}")
    return ", ".join(parts)

