"""The one reader of raw fundus layouts, shared by prepare (labels required) and predict (optional).

Layouts, each a local path or a URI (``s3://``, ``gs://``, ``file://``), listed and parsed here
through pyarrow filesystems (``aptos_ray.storage``):

* a labels/ids CSV (``id_code,diagnosis[,split]``) and its image folder: ``<stem>_images/``
  (Kaggle: ``train.csv`` + ``train_images/``, ``test.csv`` + ``test_images/``) or ``images/`` beside
  it, or the one given; ids without extension; predict takes a CSV without labels too.
* class folders ``0/ .. 4/`` or ``No_DR/ Mild/ Moderate/ Severe/ Proliferate_DR/`` (any case),
  optionally below ``train/ val/ test/``.
* a RetinaMNIST ``.npz`` (``{train,val,test}_{images,labels}``): the official splits are kept.
* predict only: a plain folder of images (no labels).

Each input becomes a record ``{id, grade, source, split}`` (grade None when unlabelled, split None
when the input gives none; npz records carry ``array``, records of local files ``listed_on``: the
disk the driver listed them on) or a quarantine entry ``{id, source, reason}``. Image bytes are
never read here: Ray tasks read them from ``source``, a path or URI (``sources.read_image``).
"""

from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from aptos_ray import storage
from aptos_ray.data.files import IMAGE_EXTENSIONS, escape_reason, is_own_output, resolve_image  # noqa: F401
from aptos_ray.data.format import GRADES, SPLITS
from aptos_ray.errors import DataError

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


@dataclass(frozen=True)
class Reading:
    """What a job needs from a raw input."""

    training: bool  # prepare: every record needs a usable grade (and a valid split cell); predict: optional
    csv_names: tuple[str, ...]  # a folder's CSV, by preference (prepare: train.csv, labels.csv; predict: test.csv)
    input_key: str  # the option that names the input, for messages
    images: str = ""  # the image folder when not beside the CSV (prepare.images)
    ignored_csv: tuple[str, ...] = ()  # prefixes of CSVs that are no ids list (Kaggle's sample_submission)
    # Links out of the input folder are followed (a subset made of links into one image store) and
    # recorded by the path they resolve to; False quarantines them, for inputs from an untrusted source.
    follow_symlinks: bool = True


def reason_kind(reason: str) -> str:
    """'tiny image: 20x20 < 32' -> 'tiny image' (used to count quarantine reasons)."""
    return reason.split(":", 1)[0]


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def read_layout(path: str, how: Reading) -> Source:
    """Read the raw input at ``path`` (existing: the caller checks) in whichever layout it has."""
    path = _normalised(path)
    if storage.file_type(path) == "File":
        if storage.name(path).lower().endswith(".csv"):
            src = read_csv_layout(path, _images_dir(path, how), how)
        elif storage.name(path).lower().endswith(".npz"):
            src = read_npz(path)
        else:
            raise DataError(f"{path}: expected a folder, a labels .csv or a RetinaMNIST .npz")
    else:
        src = _read_folder(path, how)
    disk = storage.local_disk()
    for record in src.records:  # a task that cannot open it can then tell "not on this node" from "removed"
        if "array" not in record and not storage.is_uri(record["source"]):
            record["listed_on"] = disk
    return src


def _normalised(path: str) -> str:
    """Local paths (``file://`` ones too) absolute, without a trailing slash; URIs as they are."""
    if storage.is_uri(path) and not path.startswith("file://"):
        base, options = storage.split_options(path)
        return base.rstrip("/") + options
    return os.path.abspath(storage.filesystem(path)[1])


def _local(path: str) -> str | None:
    """The local file path behind ``path``, or None for a remote URI (no links to check there)."""
    return None if storage.is_uri(path) else path


def _read_folder(path: str, how: Reading) -> Source:
    entries = storage.list_dir(path)
    csv = _find_csv(path, entries, how)
    if csv is not None:
        return read_csv_layout(csv, _images_dir(csv, how), how)
    if _class_folder_root(entries) or _split_class_roots(path, entries):
        return read_class_folders(path, entries, how.follow_symlinks)
    npzs = [n for n, kind in entries if kind == "File" and n.lower().endswith(".npz")]
    if len(npzs) == 1:
        return read_npz(storage.join(path, npzs[0]))
    if len(npzs) > 1:
        raise DataError(f"{path}: several .npz files ({', '.join(npzs)}); pass one as --{how.input_key}")
    if not how.training and any(kind == "File" for _, kind in entries):
        return read_image_folder(path, entries)
    raise DataError(
        f"{path}: no images found: no labels CSV ({' / '.join(how.csv_names)}), no class folders (0..4 or "
        f"No_DR, Mild, ...) and no .npz" + ("; point --prepare.input at one of those" if how.training else
                                             ", and no image files (.png/.jpg/.jpeg)")
    )


def _find_csv(folder: str, entries: list[tuple[str, str]], how: Reading) -> str | None:
    files = [n for n, kind in entries if kind == "File"]
    for name in how.csv_names:
        if name in files:
            return storage.join(folder, name)
    csvs = [n for n in files if n.lower().endswith(".csv") and not n.startswith(how.ignored_csv or ("\0",))]
    if len(csvs) > 1:
        raise DataError(f"{folder}: several CSV files ({', '.join(csvs)}); pass the labels CSV as --{how.input_key}")
    return storage.join(folder, csvs[0]) if csvs else None


def _images_dir(csv: str, how: Reading) -> str:
    """``how.images``, else ``<stem>_images/`` or ``images/`` beside the CSV, else its only ``*_images/``."""
    if how.images:
        images = _normalised(how.images)
        if storage.file_type(images) != "Directory":
            raise DataError(f"{images}: image folder not found (--prepare.images)")
        return _real(images)
    parent, stem = storage.parent(csv), storage.name(csv).rsplit(".", 1)[0]
    folders = [n for n, kind in storage.list_dir(parent) if kind == "Directory"]
    others = [n for n in folders if n.endswith("_images")]
    for name in (f"{stem}_images", "images", *(others if len(others) == 1 else [])):
        if name in folders:
            return _real(storage.join(parent, name))
    hint = "; pass the image folder as --prepare.images=DIR" if how.training else ""
    raise DataError(f"{csv}: no images found: neither {stem}_images/ nor images/ beside it{hint}")


def _real(path: str) -> str:
    """Local folders with links resolved, once (sources are then absolute real paths); URIs as they are."""
    return os.path.realpath(path) if _local(path) else path


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


# ---------------------------------------------------------------- layouts


def read_csv_layout(csv: str, images: str, how: Reading) -> Source:
    """A labels CSV (``id_code,diagnosis[,split]``; predict: labels optional) plus an image folder."""
    table = _read_table(csv)
    columns = {c.strip().lower(): c for c in table.columns}
    id_col = next((columns[c] for c in ID_COLUMNS if c in columns), None)
    label_col = next((columns[c] for c in LABEL_COLUMNS if c in columns), None)
    found = ", ".join(map(str, table.columns)) or "none"
    if id_col is None:
        raise DataError(f"{csv}: no id column (expected one of {', '.join(ID_COLUMNS)}; found: {found})")
    if label_col is None and how.training:
        raise DataError(
            f"{csv}: missing label column (expected one of {', '.join(LABEL_COLUMNS)}; found: {found}); "
            f"add a 'diagnosis' column with grades 0-4"
        )
    if table.empty:
        raise DataError(f"{csv}: empty dataset: the CSV has a header but no rows")
    listing = {n for n, kind in storage.list_dir(images) if kind == "File"}
    if not any(is_image_name(n) for n in listing):
        raise DataError(f"{images}: no images found (.png/.jpg/.jpeg) for {csv}"
                        + ("; set --prepare.images=DIR" if how.training else ""))
    split_col = columns.get("split") if how.training else None
    src = Source([], info={"layout": "csv", "labels": csv if storage.is_uri(csv) else os.path.realpath(csv),
                           "images": images, "rows": int(len(table)), "split_column": split_col is not None,
                           "unusable_grades": 0})
    first_line: dict[str, int] = {}
    listed = _Listing(listing, {n.lower(): n for n in listing}, {})
    labels = table[label_col].tolist() if label_col else [None] * len(table)
    splits = table[split_col].tolist() if split_col else [None] * len(table)
    for line, (id_, label, split) in enumerate(zip(table[id_col], labels, splits), start=2):  # 1: header
        _add_csv_row(src, images, listed, str(id_).strip(), label, split, line, first_line, how)
    # images with no CSV row: not data we can use (no label), but worth a line in the manifest
    src.info["unlisted_images"] = sum(
        1 for n in listing if is_image_name(n) and n not in first_line and os.path.splitext(n)[0] not in first_line
    )
    return src


def _read_table(csv: str) -> pd.DataFrame:
    try:
        return pd.read_csv(io.BytesIO(storage.read_bytes(csv)), dtype=str, keep_default_na=False,
                           skipinitialspace=True)
    except pd.errors.EmptyDataError:
        raise DataError(f"{csv}: empty dataset: the CSV is empty") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise DataError(f"{csv}: cannot parse the CSV ({e})") from None


@dataclass
class _Listing:
    """An image folder's file names, lower-cased for hints, and the files already taken by an id."""

    names: set[str]
    folded: dict[str, str]  # lower-cased name -> name
    taken: dict[str, tuple[str, int]]  # file (links resolved) -> (id, CSV line) of its first row


def _add_csv_row(src, images, listed: _Listing, id_, label, split_value, line, first_line, how: Reading) -> None:
    source = storage.join(images, id_) if id_ else f"{images}:line {line}"
    if id_ in first_line:
        src.quarantine(id_, source, f"duplicate id: first on line {first_line[id_]}")
        return
    first_line[id_] = line
    grade, reason = parse_grade(label)
    if reason and not how.training:  # predict: an unusable label makes an unlabelled input, not an unreadable one
        src.info["unusable_grades"] += label is not None and reason != "missing grade"
        grade, reason = None, ""
    split = None
    if not reason:
        split, reason = parse_split(split_value)
    if not reason:
        path, reason = resolve_image(images, id_, listed.names, listed.folded)
    if not reason and _local(path):
        reason = "" if how.follow_symlinks else escape_reason(path, images)
        path = os.path.realpath(path)
    if not reason and path in listed.taken:  # "a8" and "a8.png": one photograph, one row
        first_id, first = listed.taken[path]
        reason = f"duplicate file: same file as id {first_id!r} on line {first}"
    if reason:
        src.quarantine(id_, source, reason)
        return
    listed.taken[path] = (id_, line)
    src.records.append({"id": id_, "grade": grade, "source": path, "split": split})


def _class_folder_root(entries: list[tuple[str, str]]) -> dict[str, int] | None:
    """{subfolder name: grade} when the entries hold at least one class folder, else None."""
    matches = {n: CLASS_FOLDERS[n.lower()] for n, kind in entries if kind == "Directory" and n.lower() in CLASS_FOLDERS}
    return matches or None


def _split_class_roots(folder: str, entries: list[tuple[str, str]]) -> dict[str, str]:
    """{split: folder} for ``train/ val/ test/`` subfolders that themselves hold class folders."""
    roots = {}
    for name, kind in entries:
        if kind == "Directory" and name.lower() in SPLIT_ALIASES:
            path = storage.join(folder, name)
            if _class_folder_root(storage.list_dir(path)):
                roots[SPLIT_ALIASES[name.lower()]] = path
    return roots


def read_class_folders(folder: str, entries: list[tuple[str, str]] | None = None,
                       follow_symlinks: bool = True) -> Source:
    """``<folder>/<class>/*.png`` (or ``<folder>/<split>/<class>/*.png``); the id is the file stem."""
    entries = storage.list_dir(folder) if entries is None else entries
    roots = _split_class_roots(folder, entries) or {None: folder}
    src = Source([], info={"layout": "class_folders", "images": _real(folder), "splits": sorted(k for k in roots if k)})
    seen: dict = {}  # id -> file, and ("file", file with links resolved) -> its first path
    skipped: list[str] = []
    for split, root in sorted(roots.items(), key=lambda kv: SPLITS.index(kv[0]) if kv[0] else 0):
        subs = storage.list_dir(root)
        classes = _class_folder_root(subs) or {}
        for name, kind in subs:
            sub = storage.join(root, name)
            if kind != "Directory" or (split is None and name.lower() in SPLIT_ALIASES
                                        and _class_folder_root(storage.list_dir(sub))):
                continue  # a split folder; handled through _split_class_roots
            for file in input_files(sub, skipped):
                _add_class_file(src, file, classes.get(name), name, split, seen, folder, follow_symlinks)
    if skipped:
        src.info["skipped_own_outputs"] = skipped
        print(f"note: skipped {len(skipped)} folder(s) written by prepare itself: {', '.join(skipped)}")
    if not src.records and not src.quarantined:
        raise DataError(f"{folder}: no images found in its class folders")
    return src


def input_files(folder: str, skipped: list[str]) -> list[str]:
    """Every non-hidden file below ``folder``, sorted, except inside our own outputs (noted in
    ``skipped``): a dataset prepared into a class folder must not come back as grade-N images.
    Hidden folders (a writer's ``.NAME.tmp-*`` staging) are skipped too; local links to folders
    are not followed."""
    entries = storage.list_dir(folder)
    if is_own_output(storage.name(folder), {n for n, kind in entries if kind == "File"}):
        skipped.append(folder)
        return []
    files = []
    for name, kind in entries:
        path = storage.join(folder, name)
        if kind == "File":
            files.append(path)
        elif kind == "Directory" and not (_local(path) and os.path.islink(path)):
            files += input_files(path, skipped)
    return sorted(files)


def _add_class_file(src: Source, file: str, grade: int | None, folder_name: str, split, seen, top: str,
                    follow_symlinks: bool) -> None:
    name = storage.name(file)
    id_ = os.path.splitext(name)[0]
    escapes = escape_reason(file, top) if _local(file) and not follow_symlinks else ""
    real = _real(file)
    if escapes:
        src.quarantine(id_, file, escapes)
    elif grade is None:
        src.quarantine(id_, file, f"unknown class folder: {folder_name!r} (expected 0-4 or No_DR, Mild, ...)")
    elif not is_image_name(name):
        src.quarantine(id_, file, f"unsupported file type: {os.path.splitext(name)[1] or 'none'}")
    elif id_ in seen:
        src.quarantine(id_, file, f"duplicate id: also {seen[id_]}")
    elif ("file", real) in seen:  # two links to one photograph, maybe in two class folders
        src.quarantine(id_, file, f"duplicate file: same file as {seen['file', real]}")
    else:
        seen[id_], seen["file", real] = file, file
        src.records.append({"id": id_, "grade": grade, "source": real, "split": split})


def read_image_folder(folder: str, entries: list[tuple[str, str]]) -> Source:
    """Every file of a folder, no labels (predict); files that are not images are quarantined, not skipped."""
    src = Source([], info={"layout": "folder", "images": _real(folder)})
    seen: dict[str, str] = {}
    for name in (n for n, kind in entries if kind == "File"):
        id_, ext = os.path.splitext(name)
        file = storage.join(_real(folder), name)
        if not is_image_name(name):
            src.quarantine(id_, file, f"not an image file: {ext or 'no extension'}")
        elif id_ in seen:  # a.png and a.jpg would give one id twice
            src.quarantine(id_, file, f"duplicate id: also {seen[id_]}")
        else:
            seen[id_] = file
            src.records.append({"id": id_, "grade": None, "source": file, "split": None})
    if not src.records:
        raise DataError(f"{folder}: no images (.png/.jpg/.jpeg), no ids CSV and no class folders")
    return src


def read_npz(path: str) -> Source:
    """RetinaMNIST-style ``.npz``; ids ``<split>_<idx:04d>``, sources ``npz:<split>:<idx>``. The
    arrays (28 px) are read here, on the driver, and travel with the records."""
    try:
        data = np.load(io.BytesIO(storage.read_bytes(path)), allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read the .npz ({e})") from None
    with data:
        present = [s for s in NPZ_SPLITS if f"{s}_images" in data.files]
        if not present:
            raise DataError(f"{path}: no images found: expected arrays train_images/train_labels "
                            f"(and val_, test_); it has {', '.join(data.files)}")
        src = Source([], info={"layout": "npz", "npz": _real(path), "splits": present})
        for split in present:
            if f"{split}_labels" not in data.files:
                raise DataError(f"{path}: missing label column: {split}_images has no {split}_labels array")
            _add_npz_split(src, data[f"{split}_images"], data[f"{split}_labels"], split, path)
    return src


def _add_npz_split(src: Source, images: np.ndarray, labels: np.ndarray, split: str, path: str) -> None:
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

