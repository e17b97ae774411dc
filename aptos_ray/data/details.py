"""The per-image sidecar of a prepared dataset: ``<dataset>/_images.parquet``.

One row per input image, written or quarantined (``num_inputs`` rows): id, grade, split ("" when
quarantined), source, the quarantine ``reason`` ("" when written), the original's size and
brightness, the pHash, the sha256 of the stored bytes and the near-duplicate group. What used to
be per-image maps in ``manifest.json`` (``original_sizes``, ``brightness``, ``quarantined``,
``duplicates.groups``) lives here, so the manifest stays a few kilobytes at any dataset size.

The leading underscore keeps it out of the rows: Ray Data and pyarrow datasets skip ``_`` and
``.`` files when they read a folder, so ``read_parquet(<dataset>)`` still yields only images.
"""

from __future__ import annotations

from collections import defaultdict

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from aptos_ray import storage

DETAILS = "_images.parquet"
SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("grade", pa.int8()),  # -1 when the input had no usable grade
        ("split", pa.string()),  # "" when quarantined
        ("source", pa.string()),
        ("reason", pa.string()),  # quarantine reason, "" when written
        ("orig_height", pa.int32()),
        ("orig_width", pa.int32()),
        ("brightness", pa.float64()),  # mean of the original photograph, 0..255
        ("phash", pa.string()),
        ("digest", pa.string()),  # sha256 of the stored image bytes
        ("dup_group", pa.int32()),  # near-duplicate group, -1 when none
    ]
)


def write_details(dataset: str, table: pa.Table) -> None:
    """Write the sidecar (a local path or URI); ``table`` has the columns of ``SCHEMA``."""
    fs, inner = storage.filesystem(storage.join(dataset, DETAILS))
    pq.write_table(table.select(SCHEMA.names).cast(SCHEMA), inner, filesystem=fs, compression="zstd")


def read_details(dataset: str, manifest: dict, columns: list[str] | None = None) -> pa.Table:
    """The sidecar's rows (only ``columns`` when given); none for a dataset written without one."""
    path = storage.join(dataset, DETAILS)
    if not storage.exists(path):
        table = SCHEMA.empty_table()
        return table.select(columns) if columns else table
    fs, inner = storage.filesystem(path)
    return pq.read_table(inner, filesystem=fs, columns=columns)


def written(table: pa.Table) -> pa.Table:
    return table.filter(pc.equal(table["reason"], ""))


def quarantined(table: pa.Table) -> list[dict]:
    """``[{id, source, reason}]`` of the quarantined inputs, in the sidecar's order."""
    rows = table.filter(pc.not_equal(table["reason"], ""))
    return rows.select(["id", "source", "reason"]).to_pylist()


def duplicate_groups(table: pa.Table) -> list[dict]:
    """Near-duplicate groups ``[{ids, grades, splits, conflicting}]`` in group order (members in
    the sidecar's order, which is the input's)."""
    rows = table.filter(pc.greater_equal(table["dup_group"], 0)).select(["id", "grade", "split", "dup_group"])
    members: dict[int, list[tuple]] = defaultdict(list)
    for id_, grade, split, group in zip(*(rows[c].to_pylist() for c in rows.column_names)):
        members[group].append((id_, grade, split))
    return [{"ids": [m[0] for m in ms], "grades": [m[1] for m in ms], "splits": [m[2] for m in ms],
             "conflicting": len({m[1] for m in ms}) > 1} for _, ms in sorted(members.items())]
