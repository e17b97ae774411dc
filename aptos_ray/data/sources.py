"""Raw fundus data in its many layouts -> labelled records plus a quarantine.

Nothing here crashes halfway or drops an input silently: each input becomes either a record
or a quarantine entry ``{id, source, reason}``. Only problems that make the whole input
unusable (no images, no label column, nothing left, a single grade) stop the job, with a
``DataError`` that names the file and the fix.

Layouts (``prepare.input``):

* Kaggle: a folder with ``train.csv`` (``id_code,diagnosis``) and ``train_images/`` or ``images/``
  beside it (or ``prepare.images``); ids without extension; ``labels.csv`` + ``images/`` too.
* any labels CSV given directly, optionally with a ``split`` column (train/val/test) that is honoured.
* class folders ``0/ .. 4/`` or ``No_DR/ Mild/ Moderate/ Severe/ Proliferate_DR/`` (any case),
  optionally below ``train/ val/ test/``.
* a RetinaMNIST ``.npz`` (``{train,val,test}_{images,labels}``): the official splits are kept.

A record is ``dict(id, grade, source, split)`` (split None when the input gives none); npz
records also carry ``array``. Decoding happens later, in Ray tasks, through ``read_image``.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from aptos_ray.config import PrepareConfig
from aptos_ray.data.files import escape_reason, input_files
from aptos_ray.data.format import GRADES, SPLITS
from aptos_ray.data.preprocess import ImageError, load_image, to_rgb_uint8
from aptos_ray.errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
ID_COLUMNS = ("id_code", "id", "image", "image_id")  # Kaggle 2019, generic, Kaggle 2015
LABEL_COLUMNS = ("diagnosis", "grade", "level", "label")
CLASS_FOLDERS = {
    "no_dr": 0, "mild": 1, "moderate": 2, "severe": 3, "proliferate_dr": 4, "proliferative_dr": 4,
    **{str(g): g for g in GRADES},
}
SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
NPZ_SPLITS = ("train", "val", "test")


@dataclass
class Source:
    """What a raw input yields: usable records, quarantined entries, and what was read."""

    records: list[dict]
    quarantined: list[dict] = field(default_factory=list)
    info: dict = field(default_factory=dict)  # layout, paths, counts: goes to manifest["input"]

    def quarantine(self, id_: str, source: str, reason: str) -> None:
        self.quarantined.append({"id": str(id_), "source": str(source), "reason": reason})


def reason_kind(reason: str) -> str:
    """'tiny image: 20x20 < 32' -> 'tiny image' (used to count quarantine reasons)."""
    return reason.split(":", 1)[0]


# ---------------------------------------------------------------- entry point


def read_source(cfg: PrepareConfig) -> Source:
    """Read ``cfg.input`` in whichever layout it has; ``DataError`` when it is unusable."""
    path = Path(cfg.input)
    if "://" in cfg.input:
        raise DataError(f"{cfg.input}: prepare reads local paths only; copy the raw data to a local or mounted folder")
    if not path.exists():
        raise DataError(f"{path}: input not found; set --prepare.input to a dataset folder, labels CSV or .npz")
    if path.is_file():
        if path.suffix.lower() == ".csv":
            src = read_csv_layout(path, _images_dir(cfg, path))
        elif path.suffix.lower() == ".npz":
            src = read_npz(path)
        else:
            raise DataError(f"{path}: expected a folder, a labels .csv or a RetinaMNIST .npz")
    else:
        src = _read_folder(path, cfg)
    check_usable(src, str(path))
    return src


def _read_folder(path: Path, cfg: PrepareConfig) -> Source:
    csv = _find_csv(path)
    if csv is not None:
        return read_csv_layout(csv, _images_dir(cfg, csv))
    if _class_folder_root(path) is not None or _split_class_roots(path):
        return read_class_folders(path)
    npzs = sorted(path.glob("*.npz"))
    if len(npzs) == 1:
        return read_npz(npzs[0])
    if len(npzs) > 1:
        raise DataError(f"{path}: several .npz files ({', '.join(p.name for p in npzs)}); pass one as --prepare.input")
    raise DataError(
        f"{path}: no images found: no labels CSV (train.csv / labels.csv), no class folders (0..4 or "
        f"No_DR, Mild, ...) and no .npz; point --prepare.input at one of those"
    )


def _find_csv(folder: Path) -> Path | None:
    for name in ("train.csv", "labels.csv"):
        if (folder / name).is_file():
            return folder / name
    csvs = sorted(folder.glob("*.csv"))
    if len(csvs) == 1:
        return csvs[0]
    if len(csvs) > 1:
        names = ", ".join(p.name for p in csvs)
        raise DataError(f"{folder}: several CSV files ({names}); pass the labels CSV as --prepare.input")
    return None


def _images_dir(cfg: PrepareConfig, csv: Path) -> Path:
    if cfg.images:
        images = Path(cfg.images)
        if not images.is_dir():
            raise DataError(f"{images}: image folder not found (--prepare.images)")
        return images
    for name in ("train_images", "images"):
        if (csv.parent / name).is_dir():
            return csv.parent / name
    raise DataError(
        f"{csv}: no images found: neither train_images/ nor images/ beside it; pass the image folder "
        f"as --prepare.images=DIR"
    )


# ---------------------------------------------------------------- validation helpers


def parse_grade(value) -> tuple[int | None, str]:
    """(grade, "") or (None, reason) for a label cell; '2' and '2.0' are fine, '2.5', 'x', 7 are not."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None, "missing grade"
    text = str(value).strip()
    if text == "" or text.lower() == "nan":
        return None, "missing grade"
    if not re.fullmatch(r"[+-]?\d+(\.0*)?", text):
        return None, f"non-integer grade: {text!r}"
    grade = int(float(text))
    if grade not in GRADES:
        return None, f"grade out of range: {grade} (expected 0-4)"
    return grade, ""


def parse_split(value) -> tuple[str | None, str]:
    """(split or None, "") or (None, reason)."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None, ""
    text = str(value).strip().lower()
    if text in ("", "nan", "none"):
        return None, ""
    if text not in SPLIT_ALIASES:
        return None, f"unknown split: {value!r} (expected train/val/test)"
    return SPLIT_ALIASES[text], ""


def resolve_image(images: Path, id_: str, listing: dict[str, str]) -> tuple[Path | None, str]:
    """(path, "") or (None, reason) for an id: without extension (tries .png/.jpg/.jpeg) or with one."""
    if id_ == "" or os.path.isabs(id_) or "\\" in id_:
        return None, "id escapes the image folder" if id_ else "empty id"
    joined = os.path.normpath(os.path.join(images, id_))
    if os.path.commonpath([os.path.abspath(images), os.path.abspath(joined)]) != os.path.abspath(images):
        return None, "id escapes the image folder"
    if "/" not in id_:  # the common case: a directory listing instead of a stat per candidate
        for name in (id_, *(id_ + ext for ext in IMAGE_EXTENSIONS), *(id_ + ext.upper() for ext in IMAGE_EXTENSIONS)):
            if name in listing:
                return images / listing[name], ""
        return None, "missing file"
    for candidate in (joined, *(joined + ext for ext in IMAGE_EXTENSIONS)):
        if os.path.isfile(candidate):
            return Path(candidate), ""
    return None, "missing file"


def _listing(images: Path) -> dict[str, str]:
    with os.scandir(images) as it:
        return {e.name: e.name for e in it if e.is_file() and not e.name.startswith(".")}


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


# ---------------------------------------------------------------- layouts


def read_csv_layout(csv: Path, images: Path) -> Source:
    """A labels CSV (``id_code,diagnosis[,split]``) plus an image folder."""
    try:
        table = pd.read_csv(csv, dtype=str, keep_default_na=False, skipinitialspace=True)
    except pd.errors.EmptyDataError:
        raise DataError(f"{csv}: empty dataset: the labels CSV is empty") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise DataError(f"{csv}: cannot parse the labels CSV ({e})") from None
    columns = {c.strip().lower(): c for c in table.columns}
    id_col = next((columns[c] for c in ID_COLUMNS if c in columns), None)
    label_col = next((columns[c] for c in LABEL_COLUMNS if c in columns), None)
    found = ", ".join(map(str, table.columns)) or "none"
    if id_col is None:
        raise DataError(f"{csv}: no id column (expected one of {', '.join(ID_COLUMNS)}; found: {found})")
    if label_col is None:
        raise DataError(
            f"{csv}: missing label column (expected one of {', '.join(LABEL_COLUMNS)}; found: {found}); "
            f"add a 'diagnosis' column with grades 0-4"
        )
    if table.empty:
        raise DataError(f"{csv}: empty dataset: the labels CSV has a header but no rows")
    images = images.resolve()  # once, not per file: sources are absolute for Ray workers
    listing = _listing(images)
    if not any(_is_image_name(n) for n in listing):
        raise DataError(f"{images}: no images found (.png/.jpg/.jpeg) for {csv}; set --prepare.images=DIR")
    split_col = columns.get("split")
    src = Source([], info={"layout": "csv", "labels": str(csv.resolve()), "images": str(images),
                           "rows": int(len(table)), "split_column": split_col is not None})
    first_line: dict[str, int] = {}
    ids = [str(v).strip() for v in table[id_col]]
    splits = table[split_col].tolist() if split_col else [None] * len(table)
    for line, (id_, label, split) in enumerate(zip(ids, table[label_col], splits), start=2):  # 1: header
        _add_csv_row(src, images, listing, id_, label, split, line, first_line)
    # images with no CSV row: not data we can use (no label), but worth a line in the manifest
    src.info["unlisted_images"] = sum(
        1 for n in listing if _is_image_name(n) and n not in first_line and os.path.splitext(n)[0] not in first_line
    )
    return src


def _add_csv_row(src, images, listing, id_, label, split_value, line, first_line) -> None:
    source = str(images / id_) if id_ else f"{images}:line {line}"
    if id_ in first_line:
        src.quarantine(id_, source, f"duplicate id: first seen on line {first_line[id_]}")
        return
    first_line[id_] = line
    grade, reason = parse_grade(label)
    if not reason:
        split, reason = parse_split(split_value)
    if not reason:
        path, reason = resolve_image(images, id_, listing)
    if not reason:
        reason = escape_reason(path, images)
    if reason:
        src.quarantine(id_, source, reason)
        return
    src.records.append({"id": id_, "grade": grade, "source": os.path.abspath(path), "split": split})


def _class_folder_root(folder: Path) -> dict[str, int] | None:
    """{subfolder name: grade} when ``folder`` holds at least one class folder, else None."""
    subdirs = [d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")]
    matches = {d: CLASS_FOLDERS[d.lower()] for d in subdirs if d.lower() in CLASS_FOLDERS}
    return matches or None


def _split_class_roots(folder: Path) -> dict[str, Path]:
    """{split: folder} for ``train/ val/ test/`` subfolders that themselves hold class folders."""
    roots = {}
    for d in folder.iterdir():
        if d.is_dir() and d.name.lower() in SPLIT_ALIASES and _class_folder_root(d):
            roots[SPLIT_ALIASES[d.name.lower()]] = d
    return roots


def read_class_folders(folder: Path) -> Source:
    """``<folder>/<class>/*.png`` (or ``<folder>/<split>/<class>/*.png``); the id is the file stem."""
    roots = _split_class_roots(folder) or {None: folder}
    src = Source([], info={"layout": "class_folders", "images": str(folder.resolve()),
                           "splits": sorted(k for k in roots if k)})
    seen: dict[str, str] = {}
    skipped: list[str] = []
    for split, root in sorted(roots.items(), key=lambda kv: SPLITS.index(kv[0]) if kv[0] else 0):
        classes = _class_folder_root(root) or {}
        for sub in sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")):
            if split is None and sub.name.lower() in SPLIT_ALIASES and _class_folder_root(sub):
                continue  # a split folder; handled through _split_class_roots
            for file in input_files(sub, skipped):
                _add_class_file(src, file, classes.get(sub.name), sub.name, split, seen, folder)
    if skipped:
        src.info["skipped_own_outputs"] = skipped
        print(f"note: skipped {len(skipped)} folder(s) written by prepare itself: {', '.join(skipped)}")
    if not src.records and not src.quarantined:
        raise DataError(f"{folder}: no images found in its class folders")
    return src


def _add_class_file(src: Source, file: Path, grade: int | None, folder_name: str, split, seen, top: Path) -> None:
    id_ = file.stem
    escapes = escape_reason(file, top)
    if escapes:
        src.quarantine(id_, file, escapes)
    elif grade is None:
        src.quarantine(id_, file, f"unknown class folder: {folder_name!r} (expected 0-4 or No_DR, Mild, ...)")
    elif not _is_image_name(file.name):
        src.quarantine(id_, file, f"unsupported file type: {file.suffix or 'none'}")
    elif id_ in seen:
        src.quarantine(id_, file, f"duplicate id: also {seen[id_]}")
    else:
        seen[id_] = str(file)
        src.records.append({"id": id_, "grade": grade, "source": str(file.resolve()), "split": split})


def read_npz(path: Path) -> Source:
    """RetinaMNIST-style ``.npz``; ids ``<split>_<idx:04d>``, sources ``npz:<split>:<idx>``."""
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read the .npz ({e})") from None
    with data:
        present = [s for s in NPZ_SPLITS if f"{s}_images" in data.files]
        if not present:
            raise DataError(f"{path}: no images found: expected arrays train_images/train_labels "
                            f"(and val_, test_); it has {', '.join(data.files)}")
        src = Source([], info={"layout": "npz", "npz": str(path.resolve()), "splits": present})
        for split in present:
            if f"{split}_labels" not in data.files:
                raise DataError(f"{path}: missing label column: {split}_images has no {split}_labels array")
            _add_npz_split(src, data[f"{split}_images"], data[f"{split}_labels"], split, path)
    return src


def _add_npz_split(src: Source, images: np.ndarray, labels: np.ndarray, split: str, path: Path) -> None:
    labels = labels.reshape(len(labels), -1)
    if len(labels) != len(images) or labels.shape[1] != 1:
        raise DataError(f"{path}: {split}_labels has shape {labels.shape}, expected ({len(images)},) "
                        f"or ({len(images)}, 1)")
    for idx, (image, label) in enumerate(zip(images, labels[:, 0])):
        id_, source = f"{split}_{idx:04d}", f"npz:{split}:{idx}"
        grade, reason = parse_grade(label)
        if reason:
            src.quarantine(id_, source, reason)
        else:
            src.records.append({"id": id_, "grade": grade, "source": source, "split": split, "array": image})


# ---------------------------------------------------------------- checks


def check_usable(src: Source, where: str) -> None:
    """Fatal when nothing usable is left or only one grade is (a classifier cannot learn from it)."""
    if not src.records:
        raise DataError(f"{where}: empty dataset: {_nothing_left(src.quarantined)}")
    check_grades([r["grade"] for r in src.records], where)


def check_grades(grades: list[int], where: str) -> None:
    present = sorted(set(grades))
    if len(present) < 2:
        raise DataError(
            f"{where}: single-class dataset: every usable image has grade {present[0]} "
            f"({len(grades)} images); a grader needs at least two grades, check the labels"
        )


def _nothing_left(quarantined: list[dict]) -> str:
    if not quarantined:
        return "no labelled images"
    kinds = Counter(reason_kind(q["reason"]) for q in quarantined).most_common(3)
    text = ", ".join(f"{k} x{n}" for k, n in kinds)
    hint = "; lower --prepare.min_image_side" if kinds[0][0] == "tiny image" else ""
    return f"all {len(quarantined)} inputs were quarantined ({text}){hint}"


# ---------------------------------------------------------------- decoding (runs in Ray tasks)


BLANK_STD = 1.0  # pixel standard deviation (0..255) below which an image holds nothing to grade


def read_image(record: dict, min_side: int, max_pixels: int = 0) -> np.ndarray:
    """The record's image as uint8 RGB; ``ImageError`` for unusable files: tiny, huge (more than
    ``max_pixels``, read from the header before decoding) and blank (one uniform colour) included.

    The npz arrays (RetinaMNIST: 28 px) are exempt from ``min_side``: that check catches
    thumbnails and broken photographs, while an array dataset has a fixed, known resolution.
    """
    array = record.get("array")
    if array is not None:
        return check_not_blank(to_rgb_uint8(np.asarray(array)))
    arr = load_image(record["source"], max_pixels)
    h, w = arr.shape[:2]
    if min(h, w) < min_side:
        raise ImageError(f"tiny image: {h}x{w} < min_image_side {min_side}")
    return check_not_blank(arr)


def check_not_blank(arr: np.ndarray) -> np.ndarray:
    """A uniform image (all black, all grey: a failed capture or a placeholder) is no fundus photograph."""
    step = max(1, min(arr.shape[:2]) // 256)  # a subsample is enough to tell, and cheap on large images
    std = float(arr[::step, ::step].std())
    if std < BLANK_STD:
        raise ImageError(f"blank image: uniform pixels (std {std:.2f} < {BLANK_STD}), mean {arr.mean():.0f}")
    return arr
