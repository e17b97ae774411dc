"""prepare.py: near-duplicate aware splits (pure) and the Ray Data pipeline end to end."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from test_sources import BROKEN, DECODE_BROKEN, GOOD, write_broken_corpus

from aptos_ray.config import Config
from aptos_ray.data.details import DETAILS, duplicate_groups, quarantined, read_details
from aptos_ray.data.format import GRADES, SCHEMA, SPLITS, decode_batch, read_manifest
from aptos_ray.data.prepare import ROWS_PER_GROUP, phash_array, prepare, run_pipeline
from aptos_ray.data.sources import DataError, read_source, reason_kind
from aptos_ray.data.splits import (
    assign_splits,
    near_duplicate_groups,
    split_units,
    stratified_subset,
)

REPO = Path(__file__).resolve().parents[1]


def make_cfg(input_, output, **prepare_kw) -> Config:
    cfg = Config()
    cfg.prepare.input = str(input_)
    cfg.prepare.output = str(output)
    cfg.prepare.image_size = 64  # small and fast; the pipeline does not care
    cfg.prepare.card = False
    for k, v in prepare_kw.items():
        setattr(cfg.prepare, k, v)
    return cfg


def read_rows(dataset: Path) -> dict[str, dict]:
    """All rows of a prepared dataset, by id (pyarrow, no Ray)."""
    rows = {}
    for split in SPLITS:
        for part in sorted((dataset / split).glob("part-*.parquet")):
            groups = pq.ParquetFile(part).metadata
            assert all(groups.row_group(g).num_rows <= ROWS_PER_GROUP for g in range(groups.num_row_groups))
            table = pq.read_table(part)
            assert table.schema.equals(SCHEMA, check_metadata=False)
            for row in table.select([c for c in SCHEMA.names if c != "image"]).to_pylist():
                assert row["split"] == split
                rows[row["id"]] = row
    return rows


def check_manifest(dataset: Path) -> dict:
    """The invariants every prepared dataset must satisfy; returns the manifest, with the
    sidecar's per-image facts under ``details`` (a table) for the tests to look at."""
    m = read_manifest(str(dataset))
    details = read_details(str(dataset), m)
    assert m["num_inputs"] == m["num_written"] + m["num_quarantined"] == details.num_rows
    assert m["num_quarantined"] == len(quarantined(details)) == sum(m["quarantine_reasons"].values())
    assert len(json.dumps(m)) < 4000, "the manifest holds no per-image facts"
    rows = read_rows(dataset)
    assert len(rows) == m["num_written"]
    counts = {s: Counter() for s in SPLITS}
    for row in rows.values():
        counts[row["split"]][str(row["grade"])] += 1
    assert m["counts"] == {s: {str(g): counts[s][str(g)] for g in GRADES} for s in SPLITS}
    # near-duplicates never straddle splits (unless the input's own split column put them there)
    by_group = defaultdict(set)
    for row in rows.values():
        if row["dup_group"] >= 0:
            by_group[row["dup_group"]].add(row["split"])
    assert len(by_group) == m["duplicates"]["num_groups"] == len(duplicate_groups(details))
    if not m["duplicates"]["num_cross_split"]:
        assert all(len(s) == 1 for s in by_group.values())
    # the sidecar agrees with the rows: same ids, splits, grades, groups, sizes
    kept = details.filter(pc.equal(details["reason"], "")).to_pylist()
    assert {d["id"]: (d["split"], d["grade"], d["dup_group"], d["orig_height"], d["orig_width"]) for d in kept} == {
        i: (r["split"], r["grade"], r["dup_group"], r["orig_height"], r["orig_width"]) for i, r in rows.items()}
    assert all(0 <= d["brightness"] <= 255 and len(d["digest"]) == 64 for d in kept)
    leftovers = list(dataset.parent.glob(dataset.name + ".tmp-*")) + list(dataset.parent.glob(dataset.name + ".old-*"))
    assert not leftovers and not (dataset / "_staging").exists()
    assert sorted(p.name for p in dataset.iterdir() if p.name != "card") == [DETAILS, "manifest.json", *sorted(SPLITS)]
    m["details"] = {d["id"]: d for d in details.to_pylist()}
    return m


# ---------------------------------------------------------------- pure: duplicates, splits, subset


def test_near_duplicate_groups_are_transitive_and_exact():
    base = np.array([0, 0b1111, 0xFF00FF00, 0xFFFFFFFF00000000, 0b11111111], dtype=np.uint64)
    # 0 -(4)- 0b1111 -(4)- 0b11111111 chain into one group; the other two stay alone
    assert near_duplicate_groups(base, 4) == [[0, 1, 4]]
    assert near_duplicate_groups(base, 3) == []
    assert near_duplicate_groups(base, 8) == [[0, 1, 4]]
    hexes = ["0" * 64, "0" * 63 + "3", "f" * 64]  # 256-bit hashes: 4 words each
    assert phash_array(hexes).shape == (3, 4)
    assert near_duplicate_groups(phash_array(hexes), 2) == [[0, 1]]


def test_near_duplicate_groups_match_brute_force():
    rng = np.random.default_rng(1)
    hashes = rng.integers(0, 2**63, size=(300, 2), dtype=np.uint64)
    hashes[150:] = hashes[:150] ^ (1 << rng.integers(0, 63, size=(150, 2)).astype(np.uint64))  # 2 bits off
    groups = near_duplicate_groups(hashes, 2)
    assert sorted(map(sorted, groups)) == [[i, i + 150] for i in range(150)]


def test_assign_splits_keeps_groups_together_and_stratifies():
    rng = np.random.default_rng(0)
    n = 1000
    grades = rng.choice(5, size=n, p=[0.5, 0.1, 0.25, 0.05, 0.1])
    groups = [list(range(i, i + 3)) for i in range(0, 300, 3)]  # 100 groups of 3
    splits, cross = assign_splits(grades, [None] * n, groups, 0.15, 0.15, seed=0)
    assert not cross
    assert all(len({splits[i] for i in g}) == 1 for g in groups)
    counts = Counter(splits)
    assert abs(counts["test"] / n - 0.15) < 0.03 and abs(counts["val"] / n - 0.15) < 0.03
    for grade in range(5):
        in_grade = [s for s, g in zip(splits, grades) if g == grade]
        assert abs(in_grade.count("train") / len(in_grade) - 0.7) < 0.12, grade
    again, _ = assign_splits(grades, [None] * n, groups, 0.15, 0.15, seed=0)
    other, _ = assign_splits(grades, [None] * n, groups, 0.15, 0.15, seed=1)
    assert again == splits and other != splits


def test_assign_splits_honours_given_splits():
    grades = np.array([0, 1, 0, 1, 2, 2, 0, 1])
    given = ["test", None, "val", "train", None, None, None, None]
    groups = [[0, 1], [2, 3]]  # 1 follows 0's test; 2/3 were put apart by the input itself
    splits, cross = assign_splits(grades, given, groups, 0.2, 0.2, seed=0)
    assert splits[:4] == ["test", "test", "val", "train"]
    assert cross == [[2, 3]]


def test_split_units_edge_cases():
    assert split_units(np.array([3]), 0.15, 0.15, 0) == ["train"]
    assert sorted(split_units(np.array([0, 0, 1, 1, 4]), 0.2, 0.2, 0)) == ["test", "train", "train", "train", "val"]
    assert set(split_units(np.array([0, 1] * 10), 0.0, 0.0, 0)) == {"train"}


def test_stratified_subset():
    records = [{"id": str(i), "grade": g, "split": s} for i, (g, s) in
               enumerate([(0, "train")] * 60 + [(1, "train")] * 20 + [(0, "test")] * 20)]
    sub = stratified_subset(records, 20, seed=0)
    assert len(sub) == 20 and len({r["id"] for r in sub}) == 20
    assert Counter((r["grade"], r["split"]) for r in sub) == {(0, "train"): 12, (1, "train"): 4, (0, "test"): 4}
    assert stratified_subset(records, 0, 0) is records and stratified_subset(records, 500, 0) is records


# ---------------------------------------------------------------- end to end (Ray)


def test_prepare_broken_corpus(tmp_path, ray_session):
    raw = write_broken_corpus(tmp_path / "raw")
    shutil.copy(raw / "train_images" / "good3.png", raw / "train_images" / "copy3.png")  # exact duplicate
    with open(raw / "train.csv", "a") as f:
        f.write("copy3,1\n")  # ... with another grade
    out = tmp_path / "prepared"
    result = prepare(make_cfg(raw, out, val_fraction=0.2, test_fraction=0.2))
    assert Path(result) == out
    m = check_manifest(out)
    reasons = {i: reason_kind(d["reason"]) for i, d in m["details"].items() if d["reason"]}
    assert reasons == {**BROKEN, **DECODE_BROKEN}
    assert m["num_inputs"] == len(GOOD) + 1 + len(BROKEN) + len(DECODE_BROKEN)
    assert m["num_written"] == len(GOOD) + 1
    groups = duplicate_groups(read_details(str(out), m))
    assert [(g["ids"], g["grades"], g["conflicting"]) for g in groups] == [(["good3", "copy3"], [3, 1], True)]
    assert m["duplicates"]["num_conflicting"] == 1
    grey = m["details"]["grey16"]
    assert (grey["orig_height"], grey["orig_width"]) == (48, 48) and 0 < m["details"]["good1"]["brightness"] < 255
    assert m["input"]["layout"] == "csv" and m["config"]["image_size"] == 64

    # a second run replaces the dataset atomically and is reproducible
    first = (out / "manifest.json").read_text()
    prepare(make_cfg(raw, out, val_fraction=0.2, test_fraction=0.2))
    assert json.loads(first)["content_hash"] == check_manifest(out)["content_hash"]

    # read back through Ray Data, as training does
    ds = ray_session.data.read_parquet(str(out / "train"))
    batch = ds.take_batch(64, batch_format="numpy")
    images = decode_batch(batch, m["encoding"])
    assert images.shape == (len(batch["id"]), 64, 64, 3) and images.dtype == np.uint8 and images.max() > 0


def test_driver_reads_no_image_bytes_and_a_uri_output_is_published(tmp_path, ray_session):
    """Pass 1's workers write the rows; the driver reads them back without the image column, in
    input order. A URI output (file:// here, the code path of s3://) is built under a sibling prefix."""
    raw = write_broken_corpus(tmp_path / "raw")
    cfg = make_cfg(raw, tmp_path / "unused")
    records = read_source(cfg.prepare).records
    meta = run_pipeline(records, cfg.prepare, f"file://{tmp_path / 'staging'}")
    assert "image" not in meta.column_names and meta.num_rows == len(records)
    assert meta["order"].to_pylist() == list(range(len(records)))  # whichever task finished first
    staged = pq.read_table(tmp_path / "staging")
    written = staged.filter(pc.equal(staged["reason"], ""))
    assert written.num_rows == len(GOOD) and all(len(b) == 64 * 64 * 3 for b in written["image"].to_pylist())
    # staged rows are compressed: they share the disk with the split files until pass 2 ends
    parts = [pq.ParquetFile(f).metadata for f in (tmp_path / "staging").glob("*.parquet")]
    assert parts and {m.row_group(0).column(c).compression for m in parts for c in range(m.num_columns)} == {"ZSTD"}

    out = tmp_path / "published"
    assert prepare(make_cfg(raw, f"file://{out}")) == f"file://{out}"
    m = check_manifest(out)
    assert m["num_written"] == len(GOOD) and m["num_quarantined"] == len(BROKEN) + len(DECODE_BROKEN)
    assert not list(tmp_path.glob(".published.tmp-*"))


def test_prepare_png_encoding_and_refusals(tmp_path, ray_session):
    raw = write_broken_corpus(tmp_path / "raw")
    out = tmp_path / "png"
    prepare(make_cfg(raw, out, encoding="png", circle_mask=False, ben_graham=True))
    m = check_manifest(out)
    table = pq.read_table(out / "train")
    images = decode_batch(table.to_pydict(), "png")
    assert m["encoding"] == "png" and images.shape[1:] == (64, 64, 3)
    with pytest.raises(DataError, match="refusing to replace"):
        prepare(make_cfg(raw, raw / "train_images"))  # output pointed at the raw data by mistake
    single = tmp_path / "single"
    (single / "train_images").mkdir(parents=True)
    for name in ("a", "b"):
        shutil.copy(raw / "train_images" / "good1.png", single / "train_images" / f"{name}.png")
    (single / "train_images" / "c.png").write_bytes(b"")
    (single / "train.csv").write_text("id_code,diagnosis\na,1\nb,1\nc,0\n")
    with pytest.raises(DataError, match="single-class"):  # only after c fails to decode
        prepare(make_cfg(single, tmp_path / "never"))
    assert not (tmp_path / "never").exists() and not list(tmp_path.glob("never.tmp-*"))


def test_prepare_aptos_subset(aptos_dir, tmp_path, ray_session):
    out = tmp_path / "aptos"
    prepare(make_cfg(aptos_dir, out, limit=200))
    m = check_manifest(out)
    assert m["num_inputs"] == m["num_written"] == 200
    totals = Counter()
    for split in SPLITS:
        totals.update({g: n for g, n in m["counts"][split].items()})
    # the subset is stratified like the whole folder (0:1444 1:296 2:799 3:154 4:236)
    assert abs(totals["0"] - 99) <= 2 and abs(totals["2"] - 55) <= 2 and totals["3"] >= 8
    for split, share in [("train", 0.7), ("val", 0.15), ("test", 0.15)]:
        assert abs(sum(m["counts"][split].values()) / 200 - share) < 0.05
        for grade in ("0", "2"):  # the common grades: their split shares follow the split sizes
            assert abs(m["counts"][split][grade] / totals[grade] - share) < 0.08
    assert {(d["orig_height"], d["orig_width"]) for d in m["details"].values()} == {(224, 224)}
    ds = ray_session.data.read_parquet(str(out))
    assert ds.count() == 200


def test_prepare_retinamnist_official_splits(retinamnist_dir, tmp_path, ray_session):
    out = tmp_path / "retina"
    prepare(make_cfg(retinamnist_dir / "retinamnist.npz", out, image_size=32))
    m = check_manifest(out)
    assert {s: sum(c.values()) for s, c in m["counts"].items()} == {"train": 1080, "val": 120, "test": 400}
    assert m["num_quarantined"] == 0 and m["input"]["layout"] == "npz"
    rows = read_rows(out)
    assert rows["val_0007"]["split"] == "val" and rows["test_0399"]["source"] == "npz:test:399"
    assert rows["train_0000"]["orig_height"] == 28


# ---------------------------------------------------------------- the job script


@pytest.mark.parametrize(
    "args, message",
    [(["--prepare.input=/nonexistent/raw"], "input not found"),
     (["--prepare.bogus=1"], "unknown config key"),
     (["--prepare.val_fraction=0.6", "--prepare.test_fraction=0.5"], "test_fraction must be < 1")],  # at parse time
)
def test_job_fatal_errors_exit_2_without_traceback(tmp_path, args, message):
    proc = subprocess.run([sys.executable, str(REPO / "jobs" / "prepare.py"), *args,
                           f"--prepare.output={tmp_path / 'out'}"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env={**os.environ, "RAY_ADDRESS": ""})
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
