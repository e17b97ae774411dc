"""The per-image sidecar of a prepared dataset: ``<dataset>/_images.parquet``.

One row per input image, written or quarantined (``num_inputs`` rows): id, grade, split ("" when
quarantined), source, the quarantine ``reason`` ("" when written), the original's size and
brightness, the pHash, the sha256 of the stored bytes and the near-duplicate group. What used to
be per-image maps in ``manifest.json`` (``original_sizes``, ``brightness``, ``quarantined``,
``duplicates.groups``) lives here, so the manifest stays a few kilobytes at any dataset size.

The leading underscore keeps it out of the rows: Ray Data and pyarrow datasets skip ``_`` and
``.`` files when they read a folder, so ``read_parquet(<dataset>)`` still yields only images.
Datasets of format 1 (maps in the manifest, no sidecar) are read through ``from_manifest``.
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
    """The sidecar's rows (only ``columns`` when given); from the manifest's maps for format 1."""
    path = storage.join(dataset, DETAILS)
    if not storage.exists(path):
        table = from_manifest(manifest)
        return table.select(columns) if columns else table
    fs, inner = storage.filesystem(path)
    return pq.read_table(inner, filesystem=fs, columns=columns)


def from_manifest(manifest: dict) -> pa.Table:
    """A format-1 manifest's per-image maps as sidecar rows (the columns it has; the rest empty)."""
    sizes, brightness = manifest.get("original_sizes") or {}, manifest.get("brightness") or {}
    group_of = {i: g for g, ids in enumerate((manifest.get("duplicates") or {}).get("groups", [])) for i in ids}
    written = sorted(set(sizes) | set(brightness))
    quarantined = manifest.get("quarantined") or []
    ids = written + [str(q.get("id", "")) for q in quarantined]
    n_w = len(written)
    return pa.table({
        "id": ids, "grade": pa.array([-1] * len(ids), pa.int8()),
        "split": [""] * len(ids), "source": [""] * n_w + [str(q.get("source", "")) for q in quarantined],
        "reason": [""] * n_w + [str(q.get("reason", "")) for q in quarantined],
        "orig_height": pa.array([(sizes.get(i) or [None])[0] for i in written] + [None] * len(quarantined), pa.int32()),
        "orig_width": pa.array([(sizes.get(i) or [None, None])[1] for i in written] + [None] * len(quarantined),
                               pa.int32()),
        "brightness": pa.array([brightness.get(i) for i in written] + [None] * len(quarantined), pa.float64()),
        "phash": [""] * len(ids), "digest": [""] * len(ids),
        "dup_group": pa.array([group_of.get(i, -1) for i in written] + [-1] * len(quarantined), pa.int32()),
    }, schema=SCHEMA)


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
