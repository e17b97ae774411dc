"""What ``predict.images`` points at: a prepared dataset split, an ids CSV + image folder, or a folder
of images. Problems found while listing (missing files, duplicate ids, non-images) are reported as
unreadable inputs, never dropped.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd

from aptos_ray import storage
from aptos_ray.config import ConfigError, PrepareConfig
from aptos_ray.data.format import MANIFEST, SPLITS, read_manifest, read_split
from aptos_ray.data.sources import (
    ID_COLUMNS,
    IMAGE_EXTENSIONS,
    LABEL_COLUMNS,
    parse_grade,
    resolve_image,
)
from aptos_ray.errors import MissingFileError


@dataclass
class Inputs:
    """What ``predict.images`` holds: raw files to read (``items``) or a prepared split."""

    kind: str  # csv | folder | prepared
    path: str
    items: list[dict] = field(default_factory=list)  # raw: {order, id, grade, source}
    unreadable: list[dict] = field(default_factory=list)  # {id, source, reason}, found before decoding
    dataset: str = ""  # prepared
    split: str = ""
    encoding: str = "raw"
    num_rows: int = 0  # prepared: rows of the split
    prepared_with: dict | None = None  # prepared: the manifest's prepare config
    notes: list[str] = field(default_factory=list)

    @property
    def num_inputs(self) -> int:
        return (self.num_rows if self.kind == "prepared" else len(self.items)) + len(self.unreadable)


def find_inputs(images: str, split: str = "test") -> Inputs:
    """Work out which of the three layouts ``images`` is and list its inputs."""
    if not images:
        raise ConfigError("set --predict.images to a raw layout (CSV + image folder), an image folder or a prepared dataset")
    if storage.exists(storage.join(images, MANIFEST)):
        return prepared_inputs(images, split)
    if storage.is_uri(images):
        raise ConfigError(f"{images}: predict reads raw images from local folders; URIs work for prepared datasets only")
    path = Path(images)
    if not path.exists():
        raise MissingFileError(f"{images}: not found (--predict.images)")
    if path.is_file():
        if path.suffix.lower() != ".csv":
            raise ConfigError(f"{images}: expected a folder, a CSV of ids or a prepared dataset")
        return csv_inputs(path, images_dir_for(path))
    csv = pick_csv(path, split)
    if csv is not None:
        return csv_inputs(csv, images_dir_for(csv))
    return folder_inputs(path)


def prepared_inputs(dataset: str, split: str) -> Inputs:
    if split not in SPLITS:
        raise ConfigError(f"predict.split must be one of {', '.join(SPLITS)}, got '{split}'")
    manifest = read_manifest(dataset)
    counts = manifest.get("counts", {}).get(split)
    num_rows = sum(int(n) for n in counts.values()) if counts else read_split(dataset, split, ["id"]).num_rows
    if num_rows == 0:
        raise ConfigError(f"{dataset}: split '{split}' is empty; choose another --predict.split")
    return Inputs("prepared", dataset, dataset=storage.absolute(dataset), split=split,
                  encoding=manifest.get("encoding", "raw"), num_rows=num_rows, prepared_with=manifest.get("config"))


# What decides how a prepared image looks; the split and quality settings do not.
LOOK_KEYS = ("crop_border", "circle_mask", "ben_graham", "ben_graham_sigma", "image_size")


def preprocessing_differences(prepared_with: dict | None, training: PrepareConfig) -> list[str]:
    """Settings in which a prepared dataset differs from the training data (empty when unknown)."""
    if not isinstance(prepared_with, dict):
        return []
    trained = asdict(training)
    return [f"{k}={prepared_with[k]} (training: {trained[k]})" for k in LOOK_KEYS
            if k in prepared_with and prepared_with[k] != trained[k]]


def pick_csv(folder: Path, split: str) -> Path | None:
    """The ids CSV of a raw folder: ``<split>.csv`` (Kaggle: test.csv), else the only one there."""
    if (folder / f"{split}.csv").is_file():
        return folder / f"{split}.csv"
    csvs = sorted(p for p in folder.glob("*.csv") if not p.name.startswith("sample_submission"))
    if len(csvs) > 1:
        raise ConfigError(f"{folder}: several CSV files ({', '.join(p.name for p in csvs)}); pass one as --predict.images")
    return csvs[0] if csvs else None


def images_dir_for(csv: Path) -> Path:
    """Kaggle puts test.csv beside test_images/ and train.csv beside train_images/; also images/."""
    for name in (f"{csv.stem}_images", "images"):
        if (csv.parent / name).is_dir():
            return csv.parent / name
    others = sorted(p for p in csv.parent.glob("*_images") if p.is_dir())
    if len(others) == 1:
        return others[0]
    raise ConfigError(f"{csv}: no image folder beside it ({csv.stem}_images/ or images/)")


def csv_inputs(csv: Path, images: Path) -> Inputs:
    """A CSV of ids, labels optional (Kaggle test.csv has only ``id_code``)."""
    try:
        table = pd.read_csv(csv, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as e:
        raise ConfigError(f"{csv}: cannot read the ids CSV ({e})") from None
    columns = {c.strip().lower(): c for c in table.columns}
    id_col = next((columns[c] for c in ID_COLUMNS if c in columns), None)
    if id_col is None:
        raise ConfigError(f"{csv}: no id column (expected one of {', '.join(ID_COLUMNS)}; found {', '.join(table.columns)})")
    label_col = next((columns[c] for c in LABEL_COLUMNS if c in columns), None)
    images = images.resolve()
    listing = {e.name: e.name for e in os.scandir(images) if e.is_file()}
    inputs = Inputs("csv", str(csv), notes=[f"ids from {csv}, images from {images}"])
    first_line: dict[str, int] = {}
    bad_labels = 0
    labels = table[label_col] if label_col else [None] * len(table)
    for line, (raw_id, label) in enumerate(zip(table[id_col], labels), start=2):  # line 1: header
        id_ = str(raw_id).strip()
        source = str(images / id_) if id_ else f"{csv}:line {line}"
        if id_ in first_line:
            reason = f"duplicate id: first on line {first_line[id_]}"
            inputs.unreadable.append({"id": id_, "source": source, "reason": reason})
            continue
        first_line[id_] = line
        grade, reason = parse_grade(label) if label_col else (None, "")
        bad_labels += bool(reason) and reason != "missing grade"
        path, reason = resolve_image(images, id_, listing)
        if reason:
            inputs.unreadable.append({"id": id_, "source": source, "reason": reason})
            continue
        inputs.items.append({"order": len(first_line), "id": id_, "grade": -1 if grade is None else grade,
                             "source": str(path)})
    if bad_labels:
        inputs.notes.append(f"{bad_labels} rows of {csv.name} have an unusable grade: predicted as unlabelled")
    return inputs


def folder_inputs(folder: Path) -> Inputs:
    """Every file of a folder (no labels); files that are not images are reported, not skipped."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    inputs = Inputs("folder", str(folder))
    for i, p in enumerate(files):
        if p.suffix.lower() in IMAGE_EXTENSIONS:
            inputs.items.append({"order": i, "id": p.stem, "grade": -1, "source": str(p.resolve())})
        else:
            reason = f"not an image file: {p.suffix or 'no extension'}"
            inputs.unreadable.append({"id": p.stem, "source": str(p), "reason": reason})
    if not inputs.items:
        sub = [d.name for d in folder.iterdir() if d.is_dir()][:5]
        hint = f" (it has folders {', '.join(sub)}: class folders are read by prepare.py)" if sub else ""
        raise ConfigError(f"{folder}: no images (.png/.jpg/.jpeg) and no ids CSV{hint}")
    seen: dict[str, str] = {}
    for item in list(inputs.items):  # a.png and a.jpg would give one id twice
        if item["id"] in seen:
            inputs.items.remove(item)
            reason = f"duplicate id: also {seen[item['id']]}"
            inputs.unreadable.append({"id": item["id"], "source": item["source"], "reason": reason})
        seen.setdefault(item["id"], item["source"])
    return inputs
