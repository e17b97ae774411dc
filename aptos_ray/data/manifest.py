"""What prepare records about a dataset: ``manifest.json`` (a summary of a few kilobytes at any
size) and the rows of the per-image sidecar (``data.details``), from the driver's metadata.

Manifest keys (format 2): ``format_version``, ``created``, ``encoding``, ``image_size``,
``num_inputs``, ``num_written``, ``num_quarantined``, ``counts`` (``{split: {grade: n}}``),
``quarantine_reasons`` (``{kind: n}``), ``duplicates`` (``max_distance``, ``num_groups``,
``num_images``, ``num_conflicting``, ``num_cross_split``), ``details`` (the sidecar's name),
``config``, ``input``, ``content_hash``. Per-image facts are in the sidecar only.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections import Counter
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa

from aptos_ray import storage
from aptos_ray.config import PrepareConfig
from aptos_ray.data.details import DETAILS
from aptos_ray.data.details import SCHEMA as DETAILS_SCHEMA
from aptos_ray.data.format import GRADES, SPLITS
from aptos_ray.data.sources import reason_kind

FORMAT_VERSION = 2  # 1: per-image maps (original_sizes, brightness, quarantined, duplicate ids) in the manifest


def make_manifest(good: pa.Table, groups: list[list[int]], cross: list[list[int]], quarantined: list[dict],
                  src, records: list[dict], p: PrepareConfig) -> dict:
    """The manifest of the written rows ``good`` (id, grade, split, digest, ... in input order)."""
    ids, grades, splits = (good[c].to_pylist() for c in ("id", "grade", "split"))
    counts = {s: {str(g): 0 for g in GRADES} for s in SPLITS}
    for g, s in zip(grades, splits):
        counts[s][str(g)] += 1
    num_inputs = len(records) + len(src.quarantined)
    if num_inputs != len(ids) + len(quarantined):  # a bug, never a data problem: stop before publishing
        raise RuntimeError(f"prepare lost rows: {num_inputs} inputs != {len(ids)} written "
                           f"+ {len(quarantined)} quarantined")
    return {
        "format_version": FORMAT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "encoding": p.encoding,
        "image_size": p.image_size,
        "num_inputs": num_inputs,
        "num_written": len(ids),
        "num_quarantined": len(quarantined),
        "counts": counts,
        "quarantine_reasons": dict(Counter(reason_kind(q["reason"]) for q in quarantined).most_common()),
        "duplicates": duplicates_summary(grades, groups, cross, p.dedup_max_distance),
        "details": DETAILS,
        "config": dataclasses.asdict(p),
        "input": {**src.info, "path": storage.absolute(p.input), "num_records": len(src.records),
                  "limit": p.limit, "num_selected": len(records)},
        "content_hash": content_hash(good),
    }


def content_hash(good: pa.Table) -> str:
    """sha256 over the rows' (id, grade, split, image digest), sorted by id: same data, same hash."""
    rows = good.select(["id", "grade", "split", "digest"]).sort_by("id")
    digest = hashlib.sha256()
    for batch in rows.to_batches(max_chunksize=4096):  # no list of every row at once
        cols = batch.to_pydict()
        digest.update("".join(f"{i}\t{g}\t{s}\t{d}\n" for i, g, s, d in
                              zip(cols["id"], cols["grade"], cols["split"], cols["digest"])).encode())
    return digest.hexdigest()


def duplicates_summary(grades: list[int], groups: list[list[int]], cross: list[list[int]], max_distance: int) -> dict:
    return {
        "max_distance": max_distance,
        "num_groups": len(groups),
        "num_images": sum(len(m) for m in groups),
        "num_conflicting": sum(len({grades[i] for i in m}) > 1 for m in groups),
        # groups whose members the input itself put in different splits (honoured, but worth knowing)
        "num_cross_split": len(cross),
    }


def details_table(good: pa.Table, quarantined: list[dict]) -> pa.Table:
    """The sidecar's rows: the written images in input order, then the quarantined inputs."""
    n = len(quarantined)
    bad = pa.table({
        "id": [str(q["id"]) for q in quarantined], "grade": pa.array(np.full(n, -1, np.int8)),
        "split": [""] * n, "source": [str(q["source"]) for q in quarantined],
        "reason": [str(q["reason"]) for q in quarantined],
        "orig_height": pa.nulls(n, pa.int32()), "orig_width": pa.nulls(n, pa.int32()),
        "brightness": pa.nulls(n, pa.float64()), "phash": [""] * n, "digest": [""] * n,
        "dup_group": pa.array(np.full(n, -1, np.int32)),
    }, schema=DETAILS_SCHEMA)
    return pa.concat_tables([good.select(DETAILS_SCHEMA.names).cast(DETAILS_SCHEMA), bad])


def summary_table(manifest: dict) -> str:
    counts = manifest["counts"]
    head = f"{'split':<6}" + "".join(f"{g:>7}" for g in map(str, GRADES)) + f"{'total':>8}"
    lines = [head]
    for s in SPLITS:
        row = [counts[s][str(g)] for g in GRADES]
        lines.append(f"{s:<6}" + "".join(f"{n:>7}" for n in row) + f"{sum(row):>8}")
    totals = [sum(counts[s][str(g)] for s in SPLITS) for g in GRADES]
    lines.append(f"{'total':<6}" + "".join(f"{n:>7}" for n in totals) + f"{sum(totals):>8}")
    reasons = manifest.get("quarantine_reasons") or {}
    lines.append(f"quarantined: {manifest['num_quarantined']} of {manifest['num_inputs']} inputs"
                 + (f" ({', '.join(f'{r}: {n}' for r, n in list(reasons.items())[:10])})" if reasons else ""))
    dups = manifest["duplicates"]
    lines.append(f"near-duplicate groups: {dups['num_groups']} ({dups['num_conflicting']} with conflicting grades)")
    return "\n".join(lines)


def top_reasons(quarantined: list[dict], k: int = 3) -> str:
    return ", ".join(f"{r}: {n}" for r, n in Counter(reason_kind(q["reason"]) for q in quarantined).most_common(k))
