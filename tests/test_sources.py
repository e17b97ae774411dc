"""sources.py: every raw layout, the broken-input corpus, and the fatal cases."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from aptos_ray.config import PrepareConfig
from aptos_ray.data.preprocess import ImageError
from aptos_ray.data.sources import (
    DataError,
    parse_grade,
    read_image,
    read_source,
    reason_kind,
)

GOOD_SIZE = 48


def disc(grade: int, size: int = GOOD_SIZE, seed: int = 0) -> np.ndarray:
    """A small distinct 'fundus': a bright disc with a grade- and seed-dependent pattern."""
    rng = np.random.default_rng(grade * 1000 + seed)
    yy, xx = np.mgrid[:size, :size]
    arr = rng.integers(60, 230, (size, size, 3)).astype(np.uint8)
    arr[(yy - size / 2) ** 2 + (xx - size / 2) ** 2 > (size / 2 - 2) ** 2] = 0
    return arr


def save(path: Path, arr: np.ndarray, mode: str | None = None) -> None:
    img = Image.fromarray(arr)
    if mode == "I;16":
        img = Image.fromarray(arr[:, :, 0].astype(np.uint16) * 257)
    elif mode == "P":
        img = img.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    elif mode:
        img = img.convert(mode)
    img.save(path)


# id -> (grade cell, what the id's file is); the expected outcome of each is in BROKEN / DECODE_BROKEN.
GOOD = {f"good{i}": (i % 5, "png") for i in range(10)} | {
    "jpg0": (0, "jpg"), "jpeg1": (1, "jpeg"), "grey16": (2, "I;16"), "palette": (3, "P"),
    "rgba": (4, "RGBA"), "greyL": (1, "L"),
}
BROKEN = {  # caught while reading the labels (driver side)
    "grade7": "grade out of range",
    "gradex": "non-integer grade",
    "good0": "duplicate id",  # a second row for good0
    "../escape": "id escapes the image folder",
    "/etc/hostname": "id escapes the image folder",
    "ghost": "missing file",
}
DECODE_BROKEN = {  # caught when the image is decoded (in Ray tasks during prepare)
    "zero": "zero-byte file",
    "trunc": "truncated image",
    "text": "not an image",
    "tiny": "tiny image",
}


def write_broken_corpus(root: Path) -> Path:
    """A Kaggle-layout folder (train.csv + train_images/) holding every kind of broken input."""
    images = root / "train_images"
    images.mkdir(parents=True)
    rows = []
    for i, (id_, (grade, kind)) in enumerate(GOOD.items()):
        ext = kind if kind in ("jpg", "jpeg") else "png"
        save(images / f"{id_}.{ext}", disc(grade, seed=i), None if kind in ("png", "jpg", "jpeg") else kind)
        rows.append(f"{id_},{grade}")
    save(images / "grade7.png", disc(0))
    save(images / "gradex.png", disc(0))
    (root / "escape.png").write_bytes((images / "good1.png").read_bytes())  # exists, but outside
    rows += ["grade7,7", "gradex,x", "good0,4", "../escape,1", "/etc/hostname,1", "ghost,2"]
    (images / "zero.png").write_bytes(b"")
    data = (images / "good2.png").read_bytes()
    (images / "trunc.png").write_bytes(data[: len(data) // 2])
    (images / "text.png").write_text("this is not a png\n")
    save(images / "tiny.png", disc(1, size=16))
    rows += ["zero,0", "trunc,1", "text,2", "tiny,3"]
    save(images / "unlisted.png", disc(2))  # in the folder, not in the CSV: reported, not used
    (root / "train.csv").write_text("id_code,diagnosis\n" + "\n".join(rows) + "\n")
    return root


def cfg_for(path, **kw) -> PrepareConfig:
    return PrepareConfig(input=str(path), **kw)


# ---------------------------------------------------------------- Kaggle layout + broken corpus


def test_broken_corpus_is_quarantined_with_reasons(tmp_path):
    src = read_source(cfg_for(write_broken_corpus(tmp_path / "raw")))
    reasons = {q["id"]: reason_kind(q["reason"]) for q in src.quarantined}
    assert reasons == BROKEN
    ids = [r["id"] for r in src.records]
    assert sorted(ids) == sorted(set(GOOD) | set(DECODE_BROKEN))  # first good0 kept
    good0 = next(r for r in src.records if r["id"] == "good0")
    assert good0["grade"] == 0 and good0["split"] is None and good0["source"].endswith("good0.png")
    assert next(r for r in src.records if r["id"] == "jpeg1")["source"].endswith(".jpeg")
    assert src.info["layout"] == "csv" and src.info["unlisted_images"] == 1
    # the books balance: every CSV row is a record or a quarantine entry
    assert len(src.records) + len(src.quarantined) == src.info["rows"]


def test_read_image_quarantine_reasons_and_modes(tmp_path):
    src = read_source(cfg_for(write_broken_corpus(tmp_path / "raw")))
    for rec in src.records:
        if rec["id"] in DECODE_BROKEN:
            with pytest.raises(ImageError) as e:
                read_image(rec, min_side=32)
            assert reason_kind(e.value.reason) == DECODE_BROKEN[rec["id"]]
        else:
            arr = read_image(rec, min_side=32)
            assert arr.dtype == np.uint8 and arr.shape == (GOOD_SIZE, GOOD_SIZE, 3), rec["id"]
    tiny = next(r for r in src.records if r["id"] == "tiny")
    assert read_image(tiny, min_side=8).shape == (16, 16, 3)  # min_image_side is configurable


def test_grade_parsing():
    assert parse_grade("2") == (2, "") and parse_grade(" 3 ") == (3, "") and parse_grade("4.0") == (4, "")
    assert parse_grade(np.uint8(1)) == (1, "")
    for bad, kind in [("7", "grade out of range"), ("-1", "grade out of range"), ("2.5", "non-integer grade"),
                      ("x", "non-integer grade"), ("", "missing grade"), (None, "missing grade")]:
        grade, reason = parse_grade(bad)
        assert grade is None and reason_kind(reason) == kind, bad


def test_shared_aptos_layout(aptos_dir):
    src = read_source(cfg_for(aptos_dir))  # labels.csv + images/
    assert len(src.records) == 2929 and not src.quarantined
    grades = np.bincount([r["grade"] for r in src.records])
    assert grades.tolist() == [1444, 296, 799, 154, 236]
    assert Path(src.records[0]["source"]).is_file()


def test_csv_with_split_column_and_images_option(tmp_path):
    images = tmp_path / "pics"
    images.mkdir()
    rows = []
    for i, split in enumerate(["train", "VAL", "test", "", "valid", "bogus"]):
        save(images / f"s{i}.png", disc(i % 5))
        rows.append(f"s{i},{i % 5},{split}")
    csv = tmp_path / "meta" / "my_labels.csv"
    csv.parent.mkdir()
    csv.write_text("image_id,grade,split\n" + "\n".join(rows) + "\n")
    src = read_source(cfg_for(csv, images=str(images)))
    splits = {r["id"]: r["split"] for r in src.records}
    assert splits == {"s0": "train", "s1": "val", "s2": "test", "s3": None, "s4": "val"}
    assert [(q["id"], reason_kind(q["reason"])) for q in src.quarantined] == [("s5", "unknown split")]


def test_retinamnist_csv_layout(retinamnist_dir):
    src = read_source(cfg_for(retinamnist_dir / "labels.csv", min_image_side=16))
    splits = [r["split"] for r in src.records]
    assert (splits.count("train"), splits.count("val"), splits.count("test")) == (1080, 120, 400)


# ---------------------------------------------------------------- class folders


def test_class_folders_digits_and_names(tmp_path):
    root = tmp_path / "classes"
    for name, grade in [("No_DR", 0), ("MILD", 1), ("moderate", 2), ("Severe", 3), ("proliferate_dr", 4)]:
        (root / name).mkdir(parents=True)
        for k in range(2):
            save(root / name / f"{name}{k}.png", disc(grade, seed=k))
    (root / "extra").mkdir()
    save(root / "extra" / "odd.png", disc(1))
    (root / "MILD" / "notes.txt").write_text("not an image")
    save(root / "Severe" / "No_DR0.png", disc(3))  # same id as a No_DR image
    src = read_source(cfg_for(root))
    assert src.info["layout"] == "class_folders"
    grades = {r["id"]: r["grade"] for r in src.records}
    assert grades == {f"{n}{k}": g for n, g in [("No_DR", 0), ("MILD", 1), ("moderate", 2), ("Severe", 3),
                                                 ("proliferate_dr", 4)] for k in range(2)}
    reasons = sorted((q["id"], reason_kind(q["reason"])) for q in src.quarantined)
    assert reasons == [("No_DR0", "duplicate id"), ("notes", "unsupported file type"), ("odd", "unknown class folder")]


def test_class_folders_below_split_folders(tmp_path):
    for split, n in [("train", 3), ("val", 1), ("test", 2)]:
        for grade in (0, 4):
            (tmp_path / split / str(grade)).mkdir(parents=True)
            for k in range(n):
                save(tmp_path / split / str(grade) / f"{split}{grade}{k}.jpg", disc(grade, seed=k))
    src = read_source(cfg_for(tmp_path))
    splits = [r["split"] for r in src.records]
    assert (splits.count("train"), splits.count("val"), splits.count("test")) == (6, 2, 4)
    assert {r["grade"] for r in src.records} == {0, 4}


# ---------------------------------------------------------------- npz


def test_npz_official_splits_and_bad_labels(tmp_path):
    sizes = [("train", 10), ("val", 3), ("test", 4)]
    imgs = {s: np.stack([disc(i % 5, 28, seed=i) for i in range(n)]) for s, n in sizes}
    labels = {s: (np.arange(len(v)) % 5).reshape(-1, 1).astype(np.uint8) for s, v in imgs.items()}
    labels["test"][1] = 9
    arrays = {f"{s}_images": v for s, v in imgs.items()} | {f"{s}_labels": v for s, v in labels.items()}
    np.savez(tmp_path / "mini.npz", **arrays)
    src = read_source(cfg_for(tmp_path))  # the folder holds only the npz
    assert [(q["id"], q["source"], reason_kind(q["reason"])) for q in src.quarantined] == [
        ("test_0001", "npz:test:1", "grade out of range")]
    splits = [r["split"] for r in src.records]
    assert (splits.count("train"), splits.count("val"), splits.count("test")) == (10, 3, 3)
    rec = src.records[0]
    assert rec["id"] == "train_0000" and rec["source"] == "npz:train:0" and rec["array"].shape == (28, 28, 3)
    assert read_image(rec, min_side=32).shape == (28, 28, 3)  # arrays are exempt from min_image_side


def test_real_retinamnist_npz(retinamnist_dir):
    src = read_source(cfg_for(retinamnist_dir / "retinamnist.npz"))
    splits = [r["split"] for r in src.records]
    assert (splits.count("train"), splits.count("val"), splits.count("test")) == (1080, 120, 400)
    assert not src.quarantined


# ---------------------------------------------------------------- fatal errors


def _kaggle(tmp_path, csv_text: str, images: bool = True, grades=(0, 1)) -> Path:
    if images:
        (tmp_path / "train_images").mkdir()
        for i, g in enumerate(grades):
            save(tmp_path / "train_images" / f"a{i}.png", disc(g))
    (tmp_path / "train.csv").write_text(csv_text)
    return tmp_path


@pytest.mark.parametrize(
    "csv_text, images, expected",
    [
        ("id_code,label_wrong\na0,0\n", True, "missing label column"),
        ("file,diagnosis\na0,0\n", True, "no id column"),
        ("id_code,diagnosis\n", True, "empty dataset"),
        ("", True, "empty dataset"),
        ("id_code,diagnosis\na0,0\na1,1\n", False, "no images found"),
        ("id_code,diagnosis\nzz,0\nyy,9\n", True, "empty dataset"),
        ("id_code,diagnosis\na0,2\na1,2\n", True, "single-class dataset"),
    ],
)
def test_fatal_errors_name_the_file(tmp_path, csv_text, images, expected):
    root = _kaggle(tmp_path, csv_text, images)
    with pytest.raises(DataError) as e:
        read_source(cfg_for(root))
    assert expected in str(e.value)
    assert str(root) in str(e.value)


def test_fatal_input_problems(tmp_path):
    with pytest.raises(DataError, match="input not found"):
        read_source(cfg_for(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images found"):
        read_source(cfg_for(tmp_path / "empty"))
    (tmp_path / "two").mkdir()
    (tmp_path / "two" / "a.csv").write_text("id_code,diagnosis\n")
    (tmp_path / "two" / "b.csv").write_text("id_code,diagnosis\n")
    with pytest.raises(DataError, match="several CSV"):
        read_source(cfg_for(tmp_path / "two"))
    (tmp_path / "k").mkdir()
    root = _kaggle(tmp_path / "k", "id_code,diagnosis\na0,0\na1,1\n")
    with pytest.raises(DataError, match="image folder not found"):
        read_source(cfg_for(root, images=str(tmp_path / "elsewhere")))


def test_all_quarantined_is_fatal(tmp_path):
    root = tmp_path / "r"
    (root / "images").mkdir(parents=True)
    save(root / "images" / "a.png", disc(0))
    (root / "labels.csv").write_text("id_code,diagnosis\nb,0\n")
    with pytest.raises(DataError, match="all 1 inputs were quarantined \\(missing file x1\\)"):
        read_source(cfg_for(root))
