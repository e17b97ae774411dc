"""What ``predict.images`` points at: a prepared dataset split, or a raw layout read by the reader
prepare uses (``data.layouts``: an ids CSV + image folder, labels optional; class folders; a
RetinaMNIST .npz; a folder of images), from a local path or a URI. Problems found while listing
(missing files, duplicate ids, non-images) are reported as unreadable inputs, never dropped.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from aptos_ray import storage
from aptos_ray.config import ConfigError, PrepareConfig
from aptos_ray.data.embedded import LOOK_KEYS
from aptos_ray.data.format import MANIFEST, read_manifest, read_split
from aptos_ray.data.layouts import Reading, Source, read_layout
from aptos_ray.errors import DataError, MissingFileError


@dataclass
class Inputs:
    """What ``predict.images`` holds: raw files to read (``items``) or a prepared split."""

    kind: str  # prepared, or the raw layout: csv | class_folders | npz | folder
    path: str
    items: list[dict] = field(default_factory=list)  # raw: {order, id, grade, source[, listed_on | array]}
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
    """Work out which layout ``images`` (a local path or URI) is and list its inputs."""
    if not images:
        raise ConfigError("set --predict.images to a raw layout (CSV + image folder), an image folder or a prepared dataset")
    if storage.exists(storage.join(images, MANIFEST)):
        return prepared_inputs(images, split)
    kind = storage.file_type(images)
    if kind == "NotFound":
        raise MissingFileError(f"{images}: not found (--predict.images)")
    if kind == "File" and not storage.name(images).lower().endswith((".csv", ".npz")):
        raise ConfigError(f"{images}: expected a folder, a CSV of ids, a .npz or a prepared dataset")
    reading = Reading(training=False, csv_names=(f"{split}.csv",), input_key="predict.images",
                      ignored_csv=("sample_submission",))
    try:  # the reader prepare uses: the same layouts, with labels optional
        src = read_layout(images, reading)
    except DataError as e:
        raise ConfigError(str(e)) from None
    return raw_inputs(src, images)


def raw_inputs(src: Source, images: str) -> Inputs:
    """The records of a raw layout as predict's inputs: every record is read in a Ray task, every
    quarantined one is reported as unreadable."""
    info = src.info
    inputs = Inputs(info["layout"], info.get("labels") or info.get("npz") or images,
                    unreadable=list(src.quarantined))
    if info["layout"] == "csv":
        inputs.notes.append(f"ids from {info['labels']}, images from {info['images']}")
    if info.get("unusable_grades"):
        inputs.notes.append(f"{info['unusable_grades']} rows of {info['labels']} have an unusable grade: "
                            f"predicted as unlabelled")
    # The records become the items in place: a second dict per input would double the listing.
    for order, record in enumerate(src.records):
        record.pop("split", None)
        record["order"], record["grade"] = order, -1 if record["grade"] is None else record["grade"]
    inputs.items = src.records
    return inputs


def prepared_inputs(dataset: str, split: str) -> Inputs:
    manifest = read_manifest(dataset)
    counts = manifest.get("counts", {}).get(split)
    num_rows = sum(int(n) for n in counts.values()) if counts else read_split(dataset, split, ["id"]).num_rows
    if num_rows == 0:
        raise ConfigError(f"{dataset}: split '{split}' is empty; choose another --predict.split")
    return Inputs("prepared", dataset, dataset=storage.absolute(dataset), split=split,
                  encoding=manifest.get("encoding", "raw"), num_rows=num_rows, prepared_with=manifest.get("config"))


# What decides how a prepared image looks, besides its normalisation (compared as one setting below).
PIXEL_KEYS = tuple(k for k in LOOK_KEYS if k not in ("ben_graham", "normalise"))


def normalisation_of(prepared_with: dict) -> str:
    """prepare.normalise of a saved prepare config; ben_graham=true (the older switch) counts as it."""
    return "ben_graham" if prepared_with.get("ben_graham") else prepared_with.get("normalise", "none")


def preprocessing_differences(prepared_with: dict | None, training: PrepareConfig) -> list[str]:
    """Settings in which a prepared dataset differs from the training data (empty when unknown)."""
    if not isinstance(prepared_with, dict):
        return []
    trained = asdict(training)
    differences = [f"{k}={prepared_with[k]} (training: {trained[k]})" for k in PIXEL_KEYS
                   if k in prepared_with and prepared_with[k] != trained[k]]
    if normalisation_of(prepared_with) != normalisation_of(trained):
        differences.insert(0, f"normalise={normalisation_of(prepared_with)} (training: {normalisation_of(trained)})")
    return differences
