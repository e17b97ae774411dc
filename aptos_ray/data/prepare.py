"""The prepare job: raw fundus data -> preprocessed Parquet dataset with near-duplicate aware splits.

    read_source (driver, light: ids, grades, paths)
      -> ray.data.from_items -> map_batches(decode, validate, preprocess, phash)   (Ray tasks)
      -> driver: tqdm over iter_batches, rows staged to one Parquet file, metadata kept
      -> near-duplicate groups (phash Hamming distance) -> seeded stratified splits
      -> .<output>.tmp-PID-XXXX/{train,val,test}/part-*.parquet + manifest.json -> rename over <output>
         (storage.publish_dir; a URI output is built locally and uploaded)

Images that fail to decode come back from the Ray tasks as quarantine rows, so the books always
balance: ``num_inputs == num_written + num_quarantined``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import imagehash
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from PIL import Image
from ray.data import DataContext
from tqdm import tqdm

from aptos_ray import storage
from aptos_ray.config import Config, ConfigError, PrepareConfig
from aptos_ray.data.card import write_card
from aptos_ray.data.format import (
    GRADES,
    MANIFEST,
    SCHEMA,
    SPLITS,
    encode_image,
    read_manifest,
)
from aptos_ray.data.preprocess import ImageError, preprocess
from aptos_ray.data.sources import (
    DataError,
    check_grades,
    read_image,
    read_source,
    reason_kind,
    stop_on_driver_only_paths,
)
from aptos_ray.data.splits import (
    assign_splits,
    near_duplicate_groups,
    phash_array,
    stratified_subset,
)
from aptos_ray.ray_setup import check_seen_by_every_node, init_ray

FORMAT_VERSION = 1
BATCH_SIZE = 32  # images per Ray task batch: ~6 MB of 256 px raw output, small enough to stream
ROWS_PER_PART = 512  # rows per output Parquet file (~100 MB raw at 256 px); parts let readers parallelise
STAGING = "_staging.parquet"  # rows before splits are known; uncompressed, it is read back once
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
META_COLUMNS = ["id", "grade", "given_split", "phash", "digest", "orig_height", "orig_width", "brightness"]
STAGED_COLUMNS = ["id", "grade", "image", "height", "width", "orig_height", "orig_width", "source", "phash"]


# ---------------------------------------------------------------- entry point


def prepare(cfg: Config) -> Path | str:
    """Prepare ``cfg.prepare.input`` into ``cfg.prepare.output`` and return the output path.

    Local outputs are replaced atomically; a URI output is built locally and uploaded.
    """
    p = cfg.prepare
    if p.card_only:
        return _card_only(p.output)
    _check_fractions(p)
    _check_output(p.output)
    _check_output_outside_input(p)
    src = read_source(p)
    records = stratified_subset(src.records, p.limit, p.seed)
    init_ray(cfg.scaling)
    check_seen_by_every_node({"prepare.input": p.input, "prepare.images": p.images})

    with storage.publish_dir(p.output) as out:
        manifest = build_dataset(records, src, p, out)
    print(summary_table(manifest))
    if p.card:
        _write_card(p.output, required=False)
    return p.output if storage.is_uri(p.output) else Path(p.output)


def _check_fractions(p: PrepareConfig) -> None:
    if not (0 <= p.val_fraction < 1 and 0 <= p.test_fraction < 1 and p.val_fraction + p.test_fraction < 1):
        raise ConfigError(
            f"prepare.val_fraction ({p.val_fraction}) + prepare.test_fraction ({p.test_fraction}) must be in [0, 1)"
        )
    if p.encoding not in ("raw", "png"):
        raise ConfigError(f"prepare.encoding must be raw or png, got {p.encoding!r}")
    if p.image_size < 8:
        raise ConfigError(f"prepare.image_size must be at least 8, got {p.image_size}")


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
        "id": str(rec["id"]), "grade": int(rec["grade"]), "given_split": str(rec.get("split") or ""),
        "source": str(rec["source"]), "image": b"", "height": 0, "width": 0, "orig_height": 0,
        "orig_width": 0, "phash": "", "digest": "", "brightness": 0.0, "reason": "",
    }
    try:
        arr = read_image(rec, cfg.min_image_side, cfg.max_pixels)
        out = preprocess(arr, cfg)
    except ImageError as e:
        return {**row, "reason": e.reason}
    except Exception as e:  # never let one odd image stop the job: quarantine it with the error
        return {**row, "reason": f"unreadable image: {type(e).__name__}: {e}"}
    data = encode_image(out, cfg.encoding)
    return {
        **row, "image": data, "height": out.shape[0], "width": out.shape[1],
        "orig_height": arr.shape[0], "orig_width": arr.shape[1],
        "phash": str(imagehash.phash(Image.fromarray(out), hash_size=PHASH_SIZE)),
        "digest": hashlib.sha256(data).hexdigest(), "brightness": round(float(arr.mean()), 2),
    }


def _ray_items(records: list[dict]) -> list[dict]:
    """Light items for ``from_items``: paths, not pixels (npz arrays are tiny and have no file)."""
    items = []
    for r in records:
        item = {"id": r["id"], "grade": r["grade"], "source": r["source"], "split": r["split"] or ""}
        for key in ("array", "listed_on"):  # npz pixels; the disk the driver listed a local file on
            if key in r:
                item[key] = r[key]
        items.append(item)
    return items


def run_pipeline(records: list[dict], p: PrepareConfig, staging: Path) -> tuple[list[dict], list[dict]]:
    """Process every record with Ray Data; stage good rows to Parquet. -> (metadata rows, quarantine)."""
    ctx = DataContext.get_current()
    old_bars = ctx.enable_progress_bars
    ctx.enable_progress_bars = False  # our tqdm bar counts images; Ray's per-operator bars would interleave
    try:
        ds = ray.data.from_items(_ray_items(records), override_num_blocks=max(1, math.ceil(len(records) / BATCH_SIZE)))
        ds = ds.map_batches(process_batch, batch_size=BATCH_SIZE, batch_format="numpy", fn_kwargs={"cfg": p})
        meta, quarantined = [], []
        writer = pq.ParquetWriter(staging, _staged_schema(), **{**PARQUET_OPTIONS, "compression": "none"})
        # disable=None: no bar without a terminal (CI, ray job logs), where it would repaint line by line
        with writer, tqdm(total=len(records), unit="img", desc="prepare", file=sys.stderr, disable=None) as bar:
            for table in ds.iter_batches(batch_size=BATCH_SIZE, batch_format="pyarrow"):
                good = table.filter(pc.equal(table["reason"], ""))
                bad = table.filter(pc.not_equal(table["reason"], ""))
                if good.num_rows:
                    writer.write_table(good.select(STAGED_COLUMNS).cast(_staged_schema()))
                meta += good.select(META_COLUMNS).to_pylist()
                quarantined += bad.select(["id", "source", "reason"]).to_pylist()
                bar.update(table.num_rows)
    finally:
        ctx.enable_progress_bars = old_bars
    return meta, sorted(quarantined, key=lambda q: q["id"])


def _staged_schema() -> pa.Schema:
    return pa.schema([PROCESSED.field(c) for c in STAGED_COLUMNS])


# ---------------------------------------------------------------- dataset


def build_dataset(records: list[dict], src, p: PrepareConfig, out: Path) -> dict:
    """Write the complete dataset (Parquet per split + manifest) into ``out``; return the manifest."""
    out.mkdir(parents=True, exist_ok=True)
    staging = out / STAGING
    meta, decode_quarantine = run_pipeline(records, p, staging)
    stop_on_driver_only_paths(q["reason"] for q in decode_quarantine)  # no shared storage: no dataset
    quarantined = src.quarantined + decode_quarantine
    if not meta:
        raise DataError(f"{p.input}: empty dataset: all {len(records)} images failed to decode "
                        f"({_top_reasons(decode_quarantine)})")
    check_grades([m["grade"] for m in meta], p.input)

    hashes = phash_array([m["phash"] for m in meta])
    groups = near_duplicate_groups(hashes, p.dedup_max_distance)
    grades = np.array([m["grade"] for m in meta])
    splits, cross = assign_splits(grades, [m["given_split"] or None for m in meta], groups,
                                  p.val_fraction, p.test_fraction, p.seed)
    ids = [m["id"] for m in meta]
    dup_of = {ids[i]: g for g, members in enumerate(groups) for i in members}
    split_of = dict(zip(ids, splits))
    write_splits(staging, out, split_of, dup_of)
    staging.unlink()

    manifest = make_manifest(meta, splits, groups, cross, quarantined, src, records, p)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def write_splits(staging: Path, out: Path, split_of: dict[str, str], dup_of: dict[str, int]) -> None:
    """Route the staged rows to ``out/<split>/part-NNNNN.parquet`` with ``records.SCHEMA``."""
    writers = {s: _PartWriter(out / s) for s in SPLITS}
    for batch in pq.ParquetFile(staging).iter_batches(batch_size=256):
        table = pa.Table.from_batches([batch])
        ids = table["id"].to_pylist()
        split_col = pa.array([split_of[i] for i in ids], pa.string())
        table = table.append_column("split", split_col)
        table = table.append_column("dup_group", pa.array([dup_of.get(i, -1) for i in ids], pa.int32()))
        table = table.select(SCHEMA.names).cast(SCHEMA)
        for s in SPLITS:
            part = table.filter(pc.equal(split_col, s))
            if part.num_rows:
                writers[s].write(part)
    for w in writers.values():
        w.close()


class _PartWriter:
    """Appends tables to ``part-00000.parquet``, ``part-00001.parquet``, ... of ~ROWS_PER_PART rows."""

    def __init__(self, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        self.folder, self.parts, self.rows, self.writer = folder, 0, 0, None

    def write(self, table: pa.Table) -> None:
        if self.writer is None or self.rows >= ROWS_PER_PART:
            self._roll()
        self.writer.write_table(table)
        self.rows += table.num_rows

    def _roll(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.writer = pq.ParquetWriter(self.folder / f"part-{self.parts:05d}.parquet", SCHEMA, **PARQUET_OPTIONS)
        self.parts, self.rows = self.parts + 1, 0

    def close(self) -> None:
        if self.writer is None:  # an empty split still gets a (0-row) file, so readers see the schema
            self._roll()
        self.writer.close()


def make_manifest(meta, splits, groups, cross, quarantined, src, records, p: PrepareConfig) -> dict:
    ids = [m["id"] for m in meta]
    counts = {s: {str(g): 0 for g in GRADES} for s in SPLITS}
    for m, s in zip(meta, splits):
        counts[s][str(m["grade"])] += 1
    rows = sorted(zip(ids, (m["grade"] for m in meta), splits, (m["digest"] for m in meta)))
    content = hashlib.sha256("".join(f"{i}\t{g}\t{s}\t{d}\n" for i, g, s, d in rows).encode()).hexdigest()
    num_inputs = len(records) + len(src.quarantined)
    if num_inputs != len(meta) + len(quarantined):  # a bug, never a data problem: stop before publishing
        raise RuntimeError(f"prepare lost rows: {num_inputs} inputs != {len(meta)} written "
                           f"+ {len(quarantined)} quarantined")
    return {
        "format_version": FORMAT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "encoding": p.encoding,
        "image_size": p.image_size,
        "num_inputs": num_inputs,
        "num_written": len(meta),
        "num_quarantined": len(quarantined),
        "counts": counts,
        "quarantined": quarantined,
        "duplicates": duplicates_report(meta, groups, cross, p.dedup_max_distance),
        "original_sizes": {m["id"]: [m["orig_height"], m["orig_width"]] for m in meta},
        "brightness": {m["id"]: m["brightness"] for m in meta},
        "config": dataclasses.asdict(p),
        "input": {**src.info, "path": p.input if storage.is_uri(p.input) else str(Path(p.input).resolve()),
                  "num_records": len(src.records), "limit": p.limit, "num_selected": len(records)},
        "content_hash": content,
    }


def duplicates_report(meta, groups, cross, max_distance: int) -> dict:
    conflicting = []
    for members in groups:
        grades = [meta[i]["grade"] for i in members]
        if len(set(grades)) > 1:
            conflicting.append({"ids": [meta[i]["id"] for i in members], "grades": grades})
    return {
        "max_distance": max_distance,
        "groups": [[meta[i]["id"] for i in members] for members in groups],
        "conflicting": conflicting,
        # groups whose members the input itself put in different splits (honoured, but worth knowing)
        "cross_split": [[meta[i]["id"] for i in members] for members in cross],
    }


# ---------------------------------------------------------------- report and card


def summary_table(manifest: dict) -> str:
    counts = manifest["counts"]
    head = f"{'split':<6}" + "".join(f"{g:>7}" for g in map(str, GRADES)) + f"{'total':>8}"
    lines = [head]
    for s in SPLITS:
        row = [counts[s][str(g)] for g in GRADES]
        lines.append(f"{s:<6}" + "".join(f"{n:>7}" for n in row) + f"{sum(row):>8}")
    totals = [sum(counts[s][str(g)] for s in SPLITS) for g in GRADES]
    lines.append(f"{'total':<6}" + "".join(f"{n:>7}" for n in totals) + f"{sum(totals):>8}")
    lines.append(f"quarantined: {manifest['num_quarantined']} of {manifest['num_inputs']} inputs"
                 + (f" ({_top_reasons(manifest['quarantined'], 10)})" if manifest["quarantined"] else ""))
    dups = manifest["duplicates"]
    lines.append(f"near-duplicate groups: {len(dups['groups'])} ({len(dups['conflicting'])} with conflicting grades)")
    return "\n".join(lines)


def _top_reasons(quarantined: list[dict], k: int = 3) -> str:
    return ", ".join(f"{r}: {n}" for r, n in Counter(reason_kind(q["reason"]) for q in quarantined).most_common(k))


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
