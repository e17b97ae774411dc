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
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
from PIL import Image

from aptos_ray import storage
from aptos_ray.errors import MissingFileError

SPLITS = ("train", "val", "test")
GRADES = (0, 1, 2, 3, 4)
GRADE_NAMES = ("No DR", "Mild", "Moderate", "Severe", "Proliferative")
MANIFEST = "manifest.json"
TRAIN_COLUMNS = ["id", "grade", "image", "height", "width"]  # what training and predict read

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
    try:
        with storage.open_input(f"{dataset.rstrip('/')}/{MANIFEST}") as f:
            return json.loads(f.read())
    except FileNotFoundError:
        raise MissingFileError(
            f"{dataset}: no {MANIFEST}; is this a prepared dataset? Run `python jobs/prepare.py "
            f"--prepare.input=<raw data> --prepare.output={dataset}` first."
        ) from None


def read_split(dataset: str, split: str, columns: list[str] = TRAIN_COLUMNS, ids: list[str] | None = None) -> pa.Table:
    """One split of a prepared dataset as an Arrow table (local path or URI): only ``columns`` the
    split has, and only the rows of ``ids`` when given (images are large: read only what is shown)."""
    fs, inner = storage.filesystem(storage.join(dataset, split))
    if fs.get_file_info(inner).type.name == "NotFound":
        return pa.table({c: pa.array([], type=pa.string()) for c in columns})
    ds = pads.dataset(inner, filesystem=fs, format="parquet")
    wanted = [c for c in columns if c in ds.schema.names]
    if ids is None:
        return ds.to_table(columns=wanted)
    return _rows_of_ids(fs, ds, wanted, pa.array(sorted(set(ids)), pa.string()))


def _rows_of_ids(fs, ds: pads.Dataset, columns: list[str], ids: pa.Array) -> pa.Table:
    """The rows of ``ids``, reading ``columns`` only from the row groups that hold one (the id
    column first): a card or contact sheet shows tens of images of a split of tens of thousands,
    and a filtered scan would read, and hold in flight, every image of the split."""
    parts = [ds.schema.empty_table().select(columns)]
    for path in sorted(ds.files):
        with fs.open_input_file(path) as f:
            parquet = pq.ParquetFile(f)
            hit = pc.is_in(parquet.read(columns=["id"])["id"], value_set=ids).to_numpy(zero_copy_only=False)
            start = 0
            for group in range(parquet.num_row_groups):
                rows = parquet.metadata.row_group(group).num_rows
                if hit[start:start + rows].any():
                    table = parquet.read_row_group(group, columns=columns)
                    parts.append(table.filter(pc.is_in(table["id"], value_set=ids)))
                start += rows
    return pa.concat_tables(parts, promote_options="default")


def split_bytes(dataset: str, split: str) -> int:
    """Uncompressed bytes of one split's rows (all columns), from the Parquet footers alone."""
    fs, inner = storage.filesystem(storage.join(dataset, split))
    if fs.get_file_info(inner).type.name == "NotFound":
        return 0
    fragments = pads.dataset(inner, filesystem=fs, format="parquet").get_fragments()
    return sum(f.metadata.row_group(i).total_byte_size for f in fragments for i in range(f.metadata.num_row_groups))


def table_batches(table: pa.Table, batch_size: int, order: np.ndarray | None = None) -> Iterator[dict]:
    """Numpy row batches, like Ray Data's ``iter_batches(batch_format="numpy")``."""
    if order is None:
        order = np.arange(table.num_rows)
    for start in range(0, len(order), batch_size):
        chunk = table.take(pa.array(order[start : start + batch_size]))
        yield {name: np.asarray(chunk.column(name).to_pylist(), dtype=object if name in ("id", "image") else None)
               for name in chunk.column_names}
