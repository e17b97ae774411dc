"""The prepared dataset's on-disk format, shared by prepare, train, predict and the data card.

A prepared dataset is a folder (or URI) holding one Parquet folder per split and a manifest:

    <dataset>/manifest.json
    <dataset>/train/*.parquet   <dataset>/val/*.parquet   <dataset>/test/*.parquet

One row per image with the columns of ``SCHEMA``. ``image`` holds the preprocessed square
image, either raw uint8 bytes (H*W*3, row-major RGB) or PNG bytes, as ``manifest["encoding"]``
says. Raw is the default: training decodes nothing, a reshape is all it costs.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
from PIL import Image

from aptos_ray.errors import MissingFileError

SPLITS = ("train", "val", "test")
GRADES = (0, 1, 2, 3, 4)
GRADE_NAMES = ("No DR", "Mild", "Moderate", "Severe", "Proliferative")
MANIFEST = "manifest.json"

SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("grade", pa.int8()),  # 0..4; -1 when unlabeled (prediction inputs)
        ("split", pa.string()),
        ("image", pa.binary()),
        ("height", pa.int32()),  # stored image size
        ("width", pa.int32()),
        ("orig_height", pa.int32()),  # size of the original photograph
        ("orig_width", pa.int32()),
        ("source", pa.string()),  # path (or name) of the original image
        ("phash", pa.string()),  # perceptual hash, hex
        ("dup_group", pa.int32()),  # near-duplicate group id, -1 when the image has none
    ]
)


def encode_image(arr: np.ndarray, encoding: str = "raw") -> bytes:
    """uint8 (H, W, 3) -> bytes in the dataset's encoding."""
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected uint8 (H, W, 3), got {arr.dtype} {arr.shape}")
    if encoding == "raw":
        return np.ascontiguousarray(arr).tobytes()
    if encoding == "png":
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG", compress_level=1)
        return buf.getvalue()
    raise ValueError(f"unknown image encoding '{encoding}' (raw | png)")


def decode_image(data: bytes, height: int, width: int, encoding: str = "raw") -> np.ndarray:
    if encoding == "raw":
        return np.frombuffer(data, dtype=np.uint8).reshape(height, width, 3)
    if encoding == "png":
        return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    raise ValueError(f"unknown image encoding '{encoding}' (raw | png)")


def decode_batch(batch: dict, encoding: str = "raw") -> np.ndarray:
    """A numpy batch from Ray Data or pyarrow -> uint8 (N, H, W, 3)."""
    images = [
        decode_image(data, int(h), int(w), encoding)
        for data, h, w in zip(batch["image"], batch["height"], batch["width"])
    ]
    if not images:
        return np.zeros((0, 1, 1, 3), dtype=np.uint8)
    return np.stack(images)


def read_manifest(dataset: str) -> dict:
    """Read ``manifest.json`` of a prepared dataset (local path or URI)."""
    from aptos_ray.storage import open_input

    try:
        with open_input(f"{dataset.rstrip('/')}/{MANIFEST}") as f:
            return json.loads(f.read())
    except FileNotFoundError:
        raise MissingFileError(
            f"{dataset}: no {MANIFEST}; is this a prepared dataset? Run `python jobs/prepare.py "
            f"--prepare.input=<raw data> --prepare.output={dataset}` first."
        ) from None
