"""The prepare job: raw fundus data -> preprocessed Parquet dataset with near-duplicate aware splits.

Two passes, and no image byte ever reaches the driver:

    read_source (driver, light: ids, grades, paths)
      pass 1: ray.data.from_items -> map_batches(decode, validate, preprocess, phash)   (Ray tasks)
              -> write_parquet(<build>/_staging/)                                     (from the workers)
      driver: reads the staged rows' small columns (ids, grades, hashes, sizes, quarantine
              reasons: ~250 bytes an image) -> near-duplicate groups (phash Hamming distance)
              -> seeded stratified splits
      pass 2: read_parquet(_staging) -> map_batches(add split, dup_group)
              -> write_parquet(<build>/{train,val,test}/), partitioned by split           (from the workers)
      driver: _images.parquet (per-image details, ``data.details``) + manifest.json (a summary)
      -> <build> published as <output> (storage.publish_location: a hidden sibling renamed into
         place; for a URI, a sibling prefix in the bucket copied into place)

Images that fail to decode are staged as quarantine rows (a reason, no image), so the books always
balance: ``num_inputs == num_written + num_quarantined``. Rows are ordered by input (the ``order``
column) before splitting, so the splits do not depend on which Ray task finished first.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from pathlib import Path

import imagehash
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import ray
from PIL import Image
from ray.data.datasource import FilenameProvider

from aptos_ray import storage
from aptos_ray.config import Config, PrepareConfig
from aptos_ray.data.card import write_card
from aptos_ray.data.details import write_details
from aptos_ray.data.format import (
    MANIFEST,
    SCHEMA,
    SPLITS,
    encode_image,
    read_manifest,
)
from aptos_ray.data.manifest import details_table, make_manifest, summary_table, top_reasons
from aptos_ray.data.preprocess import ImageError, preprocess
from aptos_ray.data.sources import (
    DataError,
    check_grades,
    read_photo,
    read_source,
    stop_on_driver_only_paths,
)
from aptos_ray.data.splits import (
    assign_splits,
    near_duplicate_groups,
    phash_array,
    stratified_subset,
)
from aptos_ray.ray_setup import check_seen_by_every_node, init_ray, ray_progress

BATCH_SIZE = 32  # images per Ray task batch: ~6 MB of 256 px raw output, small enough to stream
ROWS_PER_PART = 512  # rows per output Parquet file (~100 MB raw at 256 px); parts let readers parallelise
# Rows per row group of the split files (~12 MB raw at 256 px): the card and predict's contact
# sheet read a few images by id, a row group at a time (format.read_split), not whole files.
ROWS_PER_GROUP = 64
STAGING = "_staging"  # pass 1's rows, before splits are known; read back once, by pass 2
# zstd: raw pixels shrink ~30% (snappy ~25%) at the same speed. No dictionary for the image
# column: every image is unique, and trying costs more time than the write itself.
PARQUET_OPTIONS = {"compression": "zstd", "use_dictionary": [n for n in SCHEMA.names if n != "image"]}
# 256-bit pHash (imagehash hash_size=16), not the 64-bit default. Measured on the 2,929 APTOS
# images: with 64 bits the preprocessed fundi (same disc, same black frame) collide all the time:
# 1,931 pairs within distance 4, mostly different eyes, chained into a 183-image group; even
# distance 0 had 11 false pairs of 109. With 256 bits the 98 true duplicate pairs sit at <= 4 and
# the next pair at 24, so the default prepare.dedup_max_distance=4 separates them cleanly.
PHASH_SIZE = 16

# What a Ray task returns per input: a processed row, or a quarantine row (reason set, no image).
PROCESSED = pa.schema(
    [
        ("order", pa.int64()),  # position in the input: rows are split in this order
        ("id", pa.string()),
        ("grade", pa.int8()),
        ("given_split", pa.string()),  # "" when the input gives none
        ("image", pa.binary()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("orig_height", pa.int32()),
        ("orig_width", pa.int32()),
        ("source", pa.string()),
        ("phash", pa.string()),
        ("digest", pa.string()),  # sha256 of the stored image bytes (content hash)
        ("brightness", pa.float64()),  # mean of the original image, 0..255
        ("reason", pa.string()),  # "" when the image is fine
    ]
)
# All the driver ever reads of the staged rows: everything but the image (a few hundred bytes a row).
META_COLUMNS = [n for n in PROCESSED.names if n != "image"]
# The staged rows are compressed like the splits (zstd): staged and final rows are on disk together
# until pass 2 ends, so the staging's size sets the peak disk use.
STAGING_OPTIONS = {"compression": "zstd", "use_dictionary": META_COLUMNS}


# ---------------------------------------------------------------- entry point


def prepare(cfg: Config) -> Path | str:
    """Prepare ``cfg.prepare.input`` into ``cfg.prepare.output`` and return the output path.

    Local outputs are replaced atomically; a URI output is built under a sibling prefix and copied
    into place (``storage.publish_location``).
    """
    p = cfg.prepare
    if p.card_only:
        return _card_only(p.output)
    _check_output(p.output)
    _check_output_outside_input(p)
    src = read_source(p)
    records = stratified_subset(src.records, p.limit, p.seed)
    init_ray(cfg.scaling)
    check_seen_by_every_node({"prepare.input": p.input, "prepare.images": p.images})

    with storage.named(p.output), storage.publish_location(p.output) as out:  # a full disk: one line
        manifest = build_dataset(records, src, p, out)
    print(summary_table(manifest))
    if p.card:
        _write_card(p.output, required=False)
    return p.output if storage.is_uri(p.output) else Path(p.output)


def _check_output(output: str) -> None:
    """Never replace a folder that is not a prepared dataset (e.g. output set to the raw data by mistake)."""
    if storage.is_uri(output) or not os.path.exists(output):
        return
    path = Path(output)
    is_dataset = (path / MANIFEST).is_file()
    if not path.is_dir() or (not is_dataset and any(path.iterdir())):
        raise DataError(
            f"{output}: exists and is not a prepared dataset (no {MANIFEST}); refusing to replace it. "
            f"Choose another --prepare.output or remove the folder"
        )


def _check_output_outside_input(p: PrepareConfig) -> None:
    """An output inside the raw input folder would be read back as input by the next prepare."""
    if storage.is_uri(p.output) or "://" in p.input:
        return
    output = os.path.realpath(p.output)
    for key, folder in (("prepare.input", p.input), ("prepare.images", p.images)):
        if folder and os.path.isdir(folder):
            inside = os.path.realpath(folder)
            if os.path.commonpath([inside, output]) == inside:
                raise DataError(f"{p.output}: prepare.output is inside {key} ({folder}); the next prepare would "
                                f"read it back as input. Choose an output outside the raw data")


# ---------------------------------------------------------------- Ray part


def process_batch(batch: dict, cfg: PrepareConfig) -> pa.Table:
    """Ray Data UDF: decode, validate, preprocess and hash each image of a batch of records."""
    n = len(batch["id"])
    rows = [process_record({k: v[i] for k, v in batch.items()}, cfg) for i in range(n)]
    return pa.Table.from_pylist(rows, schema=PROCESSED)


def process_record(rec: dict, cfg: PrepareConfig) -> dict:
    row = {
        "order": int(rec["order"]),
        "id": str(rec["id"]), "grade": int(rec["grade"]), "given_split": str(rec.get("split") or ""),
        "source": str(rec["source"]), "image": b"", "height": 0, "width": 0, "orig_height": 0,
        "orig_width": 0, "phash": "", "digest": "", "brightness": 0.0, "reason": "",
    }
    try:
        photo = read_photo(rec, cfg.min_image_side, cfg.max_pixels, needed=cfg.image_size)
        arr = photo.pixels
        out = preprocess(arr, cfg)
    except ImageError as e:
        return {**row, "reason": e.reason}
    except Exception as e:  # never let one odd image stop the job: quarantine it with the error
        return {**row, "reason": f"unreadable image: {type(e).__name__}: {e}"}
    data = encode_image(out, cfg.encoding)
    return {
        **row, "image": data, "height": out.shape[0], "width": out.shape[1],
        "orig_height": photo.height, "orig_width": photo.width,
        "phash": str(imagehash.phash(Image.fromarray(out), hash_size=PHASH_SIZE)),
        "digest": hashlib.sha256(data).hexdigest(), "brightness": round(float(arr.mean()), 2),
    }


def _ray_items(records: list[dict]) -> list[dict]:
    """Light items for ``from_items``: paths, not pixels (npz arrays are tiny and have no file)."""
    items = []
    for order, r in enumerate(records):
        item = {"order": order, "id": r["id"], "grade": r["grade"], "source": r["source"], "split": r["split"] or ""}
        for key in ("array", "listed_on"):  # npz pixels; the disk the driver listed a local file on
            if key in r:
                item[key] = r[key]
        items.append(item)
    return items


def run_pipeline(records: list[dict], p: PrepareConfig, staging: str) -> pa.Table:
    """Pass 1: process every record in Ray tasks, which write their rows (images included) to
    ``staging``; return the staged rows without their images, in input order."""
    fs, inner = storage.filesystem(staging)
    with ray_progress():
        ds = ray.data.from_items(_ray_items(records), override_num_blocks=max(1, math.ceil(len(records) / BATCH_SIZE)))
        ds = ds.map_batches(process_batch, batch_size=BATCH_SIZE, batch_format="numpy", fn_kwargs={"cfg": p})
        ds.write_parquet(inner, filesystem=fs, min_rows_per_file=ROWS_PER_PART, **STAGING_OPTIONS)
    meta = pads.dataset(inner, filesystem=fs, format="parquet").to_table(columns=META_COLUMNS)
    return meta.sort_by("order")


# ---------------------------------------------------------------- dataset


def build_dataset(records: list[dict], src, p: PrepareConfig, out: str) -> dict:
    """Write the complete dataset (Parquet per split, sidecar, manifest) into ``out`` (a local
    folder or URI prefix); return the manifest."""
    staging = storage.join(out, STAGING)
    meta = run_pipeline(records, p, staging)
    stop_on_driver_only_paths(meta["reason"].to_pylist())  # no shared storage: no dataset
    good = meta.filter(pc.equal(meta["reason"], ""))
    bad = meta.filter(pc.not_equal(meta["reason"], "")).sort_by("id")
    quarantined = src.quarantined + bad.select(["id", "source", "reason"]).to_pylist()
    if not good.num_rows:
        raise DataError(f"{p.input}: empty dataset: all {len(records)} images failed to decode "
                        f"({top_reasons(quarantined)})")
    grades = good["grade"].to_numpy()
    check_grades(grades.tolist(), p.input)

    groups = near_duplicate_groups(phash_array(good["phash"].to_pylist()), p.dedup_max_distance)
    splits, cross = assign_splits(grades, [s or None for s in good["given_split"].to_pylist()], groups,
                                  p.val_fraction, p.test_fraction, p.seed)
    dup_group = np.full(good.num_rows, -1, dtype=np.int32)
    for g, members in enumerate(groups):
        dup_group[members] = g
    good = good.append_column("split", pa.array(splits, pa.string()))
    good = good.append_column("dup_group", pa.array(dup_group, pa.int32()))
    write_splits(staging, out, good.select(["id", "split", "dup_group"]))
    fs, inner = storage.filesystem(staging)
    fs.delete_dir(inner)

    manifest = make_manifest(good, groups, cross, quarantined, src, records, p)
    write_details(out, details_table(good, quarantined))
    storage.write_text(storage.join(out, MANIFEST), json.dumps(manifest, indent=1))
    return manifest


def write_splits(staging: str, out: str, assignment: pa.Table) -> None:
    """Pass 2: Ray tasks read the staged rows and write ``out/<split>/part-*.parquet`` (``SCHEMA``)
    in one read: pyarrow's directory partitioning on a copy of the split column names the folder.
    ``assignment`` (id, split, dup_group) is the driver's only contribution."""
    fs, inner = storage.filesystem(staging)
    target_fs, target = storage.filesystem(out)
    with ray_progress():
        rows = ray.data.read_parquet(inner, filesystem=fs)
        rows = rows.map_batches(with_split, batch_size=ROWS_PER_PART, batch_format="pyarrow",
                                fn_kwargs={"assignment": assignment})
        # partitioning_flavor=None: folders named by the value ("train/"), not "split_folder=train/";
        # the partition column itself is left out of the files, the split column stays in.
        rows.write_parquet(target, filesystem=target_fs, partition_cols=[SPLIT_FOLDER], partitioning_flavor=None,
                           filename_provider=PartNames(), row_group_size=ROWS_PER_GROUP, **PARQUET_OPTIONS)
    for split in set(SPLITS) - set(pc.unique(assignment["split"]).to_pylist()):
        # an empty split still gets a (0-row) file, so readers see the schema
        target_fs.create_dir(f"{target}/{split}", recursive=True)
        pq.write_table(SCHEMA.empty_table(), f"{target}/{split}/part-00000.parquet", filesystem=target_fs)


SPLIT_FOLDER = "split_folder"  # pass 2's copy of the split column that pyarrow turns into the folder name


def with_split(table: pa.Table, assignment: pa.Table) -> pa.Table:
    """Ray Data UDF: the staged rows that were written (in ``assignment``), as ``SCHEMA`` plus
    ``SPLIT_FOLDER``; quarantined rows (not in ``assignment``) are dropped."""
    where = pc.index_in(table["id"], value_set=assignment["id"])
    keep = pc.is_valid(where)
    table, where = table.filter(keep), where.filter(keep)
    table = table.append_column("split", pc.take(assignment["split"], where))
    table = table.append_column("dup_group", pc.take(assignment["dup_group"], where))
    table = table.select(SCHEMA.names).cast(SCHEMA)
    return table.append_column(SPLIT_FOLDER, table["split"])


class PartNames(FilenameProvider):
    """``part-<write>_<task>.parquet``: the name says what the file is, the rest keeps it unique."""

    def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
        return f"part-{write_uuid}_{task_index:06d}.parquet"


# ---------------------------------------------------------------- report and card


def _write_card(dataset: str, required: bool) -> None:
    try:
        write_card(dataset)
    except Exception as e:  # the dataset is complete and in place; a failed card must not hide that
        if required:
            raise
        print(f"warning: the data card failed ({type(e).__name__}: {e}); rerun with --card-only", file=sys.stderr)


def _card_only(dataset: str) -> str:
    try:
        read_manifest(dataset)
    except FileNotFoundError as e:
        raise DataError(str(e)) from None
    _write_card(dataset, required=True)
    return dataset
