"""The data card: Markdown + PNG figures of a prepared dataset, numbers checkable against the manifest."""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from aptos_ray.data.card import exposure_limits, write_card
from aptos_ray.data.details import DETAILS, write_details
from aptos_ray.data.details import SCHEMA as DETAILS_SCHEMA
from aptos_ray.data.format import GRADES, SCHEMA, SPLITS, encode_image
from aptos_ray.data.synthetic import render_fundus

# ----------------------------------------------------------------------------- a small dataset


def make_dataset(root: Path, encoding: str = "raw", originals: bool = True, n: int = 40) -> Path:
    """A prepared dataset written by hand (records.SCHEMA, the manifest keys of ARCHITECTURE.md and
    the per-image sidecar): ``n`` synthetic photographs, 2 quarantined inputs, two near-duplicate groups (one with
    conflicting grades), one very dark and one very bright original."""
    rng = np.random.default_rng(0)
    raw, out = root / "raw", root / "dataset"
    raw.mkdir(parents=True)
    grades = [g for g in GRADES for _ in range(n // 5)]
    rows, brightness = [], {}
    for k, grade in enumerate(grades):
        id_ = f"img_{k:03d}"
        original = render_fundus(grade, np.random.default_rng([9, k]), 96)[:, 8:88]  # 96 x 80, not square
        if k == 3:
            original = (original * 0.15).astype(np.uint8)  # under-exposed
        if k == 7:
            original = np.clip(original.astype(int) * 3 + 60, 0, 255).astype(np.uint8)  # over-exposed
        source = raw / f"{id_}.png"
        if originals:
            Image.fromarray(original).save(source)
        stored = np.asarray(Image.fromarray(original).resize((48, 48)))
        split = SPLITS[0] if k % 10 < 6 else SPLITS[1] if k % 10 < 8 else SPLITS[2]
        rows.append(dict(id=id_, grade=grade, split=split, image=encode_image(stored, encoding), height=48, width=48,
                         orig_height=96, orig_width=80, source=str(source) if originals else f"npz:{split}:{k}",
                         phash="0" * 64, dup_group=-1))
        brightness[id_] = round(float(original.mean()), 2)
    groups = [["img_001", "img_002"], ["img_020", "img_021", "img_030"]]  # second: grades 2, 2, 3
    for g, ids in enumerate(groups):
        for r in rows:
            if r["id"] in ids:
                r["dup_group"] = g
                r["split"] = "train"  # a group lands in one split
    for split in SPLITS:
        part = [r for r in rows if r["split"] == split]
        (out / split).mkdir(parents=True)
        pq.write_table(pa.Table.from_pylist(part, schema=SCHEMA), out / split / "part-00000.parquet")
    counts = {s: {str(g): sum(r["split"] == s and r["grade"] == g for r in rows) for g in GRADES} for s in SPLITS}
    quarantined = [
        {"id": "bad_000", "source": str(raw / "bad_000.png"), "reason": "unreadable image: cannot identify image file"},
        {"id": "bad_001", "source": str(raw / "bad_001.png"), "reason": "tiny image: 20x20 < 32 | odd"},
    ]
    manifest = {
        "format_version": 2, "created": "2026-01-01T00:00:00+00:00", "encoding": encoding, "image_size": 48,
        "num_inputs": len(rows) + len(quarantined), "num_written": len(rows), "num_quarantined": len(quarantined),
        "counts": counts,
        "config": {"input": str(raw), "image_size": 48, "crop_border": True, "circle_mask": True, "ben_graham": False,
                   "encoding": encoding, "val_fraction": 0.2, "test_fraction": 0.2, "seed": int(rng.integers(10)),
                   "dedup_max_distance": 4, "limit": 0},
        "input": {"path": str(raw)}, "content_hash": "ab" * 32,
    }
    manifest["duplicates"] = {"num_groups": len(groups), "num_cross_split": 0}
    details = [{**{k: r[k] for k in ("id", "grade", "split", "source", "orig_height", "orig_width", "dup_group")},
                "reason": "", "brightness": brightness[r["id"]], "phash": r["phash"], "digest": "0" * 64}
               for r in rows]
    details += [{**q, "grade": -1, "split": "", "dup_group": -1} for q in quarantined]
    write_details(str(out), pa.Table.from_pylist(details, schema=DETAILS_SCHEMA))
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return out


def table_rows(text: str, section: str) -> list[list[str]]:
    """Cells of the Markdown table rows (header and rule excluded) in a ``## section``."""
    body = text.split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in body.splitlines() if line.startswith("|")]
    return [[c.strip() for c in line.strip("|").split(" | ")] for line in rows[2:]]


def check_card_against_manifest(dataset: Path) -> str:
    """The checks any card must pass: its numbers are the manifest's, its figures exist."""
    manifest = json.loads((dataset / "manifest.json").read_text())
    readme = dataset / "card" / "README.md"
    text = readme.read_text()
    counts = {row[0]: [int(x) for x in row[1:]] for row in table_rows(text, "Grades per split")}
    for split in SPLITS:
        expected = [manifest["counts"][split][str(g)] for g in GRADES]
        assert counts[split] == expected + [sum(expected)], split
    totals = [sum(manifest["counts"][s][str(g)] for s in SPLITS) for g in GRADES]
    assert counts["total"] == totals + [manifest["num_written"]]
    for key in ("num_inputs", "num_written", "num_quarantined"):
        assert re.search(rf"\({key}\) \| {manifest[key]} \|", text), key
    assert "MISMATCH" not in text and text.count("- ok:") == 4
    quarantine = table_rows(text, "Quarantined inputs") if manifest["num_quarantined"] else []
    assert len(quarantine) == manifest["num_quarantined"]
    if manifest["num_quarantined"]:
        assert [r[0].strip("`") for r in quarantine] == ["bad_000", "bad_001"]
    for figure in re.findall(r"!\[[^]]*\]\(([^)]+)\)", text):
        with Image.open(readme.parent / figure) as im:
            assert im.size[0] > 100 and im.size[1] > 100, figure
    return text


# ----------------------------------------------------------------------------- tests


def test_card_numbers_and_figures(tmp_path):
    dataset = make_dataset(tmp_path)
    start = time.perf_counter()
    readme = write_card(str(dataset))
    seconds = time.perf_counter() - start
    assert readme == dataset / "card" / "README.md"
    text = check_card_against_manifest(dataset)
    assert seconds < 20, f"card took {seconds:.1f} s"
    figures = {p.name for p in (dataset / "card").glob("*.png")}
    assert figures == {"grades.png", "samples_preprocessed.png", "samples_original.png", "sizes.png",
                       "brightness.png", "brightness_extremes.png", "duplicates.png"}
    assert "| 96 x 80 | 40 |" in text  # original sizes, from the manifest
    assert "2 inputs were left out: unreadable image (1), tiny image (1)" in text
    assert "tiny image: 20x20 < 32 \\| odd" in text, "a | in a reason must not break the table"


def test_card_flags_exposure_outliers(tmp_path):
    dataset = make_dataset(tmp_path)
    write_card(str(dataset))
    text = (dataset / "card" / "README.md").read_text()
    under = next(line for line in text.splitlines() if line.startswith("- under-exposed"))
    over = next(line for line in text.splitlines() if line.startswith("- over-exposed"))
    assert "`img_003`" in under and "`img_003`" not in over
    assert "`img_007`" in over and "`img_007`" not in under
    darkest = next(line for line in text.splitlines() if line.startswith("The 8 darkest"))
    assert darkest.split(": ", 1)[1].startswith("`img_003`")
    lo, hi = exposure_limits(np.array([10.0, 11, 12, 13, 14, 100]))
    assert lo < 10 and 14 < hi < 100


def test_card_lists_duplicates_conflicting_first(tmp_path):
    dataset = make_dataset(tmp_path)
    write_card(str(dataset))
    text = (dataset / "card" / "README.md").read_text()
    assert "2 near-duplicate groups (5 images), 1 with conflicting grades" in text
    rows = table_rows(text, "Near-duplicates")
    assert rows[0][1] == "`img_020`, `img_021`, `img_030`" and rows[0][2] == "2, 2, 3" and rows[0][4] == "yes"
    assert rows[1][1] == "`img_001`, `img_002`" and rows[1][4] == "no" and rows[1][3] == "train"


def test_card_without_originals_says_so(tmp_path):
    dataset = make_dataset(tmp_path, encoding="png", originals=False)
    write_card(str(dataset))
    text = check_card_against_manifest(dataset)
    assert "Originals are not available" in text and "`npz:" in text
    assert not (dataset / "card" / "samples_original.png").exists()
    assert (dataset / "card" / "samples_preprocessed.png").is_file()


def test_card_reports_a_manifest_that_disagrees_with_the_rows(tmp_path):
    dataset = make_dataset(tmp_path)
    manifest = json.loads((dataset / "manifest.json").read_text())
    manifest["counts"]["val"]["0"] += 1
    (dataset / "manifest.json").write_text(json.dumps(manifest))
    write_card(str(dataset))
    text = (dataset / "card" / "README.md").read_text()
    assert "**MISMATCH**: counts add up to num_written" in text
    assert "val/0: manifest" in text


def test_card_rewrite_replaces_the_old_card_atomically(tmp_path):
    dataset = make_dataset(tmp_path)
    write_card(str(dataset))
    (dataset / "card" / "stale.png").write_bytes(b"old")
    first = (dataset / "card" / "README.md").read_text()
    write_card(str(dataset))
    assert (dataset / "card" / "README.md").read_text() == first, "same dataset, same card"
    assert not (dataset / "card" / "stale.png").exists()
    assert sorted(p.name for p in dataset.iterdir()) == [DETAILS, "card", "manifest.json", "test", "train", "val"]


def test_card_of_a_minimal_manifest(tmp_path):
    """Datasets written by older code or by test helpers may lack the optional keys and the sidecar."""
    dataset = make_dataset(tmp_path)
    (dataset / DETAILS).unlink()
    manifest = json.loads((dataset / "manifest.json").read_text())
    for key in ("duplicates", "config", "input", "created"):
        manifest.pop(key)
    manifest["num_inputs"], manifest["num_quarantined"] = manifest["num_written"], 0
    (dataset / "manifest.json").write_text(json.dumps(manifest))
    write_card(str(dataset))
    text = check_card_against_manifest(dataset)
    assert "records no original sizes" in text and "records no brightness" in text
    assert "No near-duplicate groups" in text and "None: all 40 inputs were written" in text


def test_card_of_a_dataset_given_as_uri(tmp_path):
    """Remote datasets (s3://, gs://) are read through pyarrow filesystems and the card is uploaded;
    file:// takes the same path without a cloud."""
    dataset = make_dataset(tmp_path)
    uri = f"file://{dataset}"
    assert write_card(uri) == f"{uri}/card/README.md"
    check_card_against_manifest(dataset)
    assert not list(Path(tempfile.gettempdir()).glob("aptos-card-*/.card.tmp-*")), "staging removed"


def test_card_of_a_missing_dataset_fails_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="prepared dataset"):
        write_card(str(tmp_path / "nothing"))


# ----------------------------------------------------------------------------- with the real prepare


@pytest.mark.ray
def test_card_of_real_prepare_runs(ray_session, aptos_dir, tmp_path):
    """prepare (Ray) writes the card beside the dataset; its numbers are the manifest's. On ~150
    real APTOS photos (a stratified `prepare.limit` subset) and on the synthetic default."""
    from aptos_ray.config import Config
    from aptos_ray.data.prepare import prepare
    from aptos_ray.data.synthetic import generate

    cfg = Config()
    cfg.synthetic.output, cfg.synthetic.num_images, cfg.synthetic.image_size = str(tmp_path / "raw"), 60, 128
    for name, source, limit in (("aptos", str(aptos_dir), 150), ("synthetic", str(generate(cfg.synthetic)), 0)):
        cfg.prepare.input, cfg.prepare.output = source, str(tmp_path / name)
        cfg.prepare.image_size, cfg.prepare.limit = 64, limit
        dataset = Path(prepare(cfg))
        text = check_card_against_manifest(dataset)
        assert f"| images written (num_written) | {limit or 60} |" in text
        assert "originals readable here" in text and (dataset / "card" / "samples_original.png").is_file()

    # --card-only regenerates the card of an existing dataset (no Ray work).
    shutil.rmtree(dataset / "card")
    cfg.prepare.card_only = True
    prepare(cfg)
    check_card_against_manifest(dataset)
