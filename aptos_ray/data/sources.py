"""Raw fundus data -> labelled records plus a quarantine, for prepare; and reading one image in a task.

Nothing here crashes halfway or drops an input silently: each input becomes either a record
or a quarantine entry ``{id, source, reason}``. Only problems that make the whole input
unusable (no images, no label column, nothing left, a single grade) stop the job, with a
``DataError`` that names the file and the fix.

The layouts themselves (Kaggle CSV + images, any labels CSV, class folders, RetinaMNIST npz),
from local paths or URIs, are read by ``data.layouts``, the reader predict shares. A record is
``dict(id, grade, source, split)`` (split None when the input gives none); npz records also carry
``array``. Decoding happens later, in Ray tasks, through ``read_image``, which reads the bytes
from ``source`` (a path or URI) through its filesystem on whichever node the task runs,
and decodes them at the size the caller needs (``read_photo``).
"""

from __future__ import annotations

from collections import Counter

import cv2
import numpy as np

from aptos_ray import storage
from aptos_ray.config import PrepareConfig
from aptos_ray.data.layouts import (  # noqa: F401  (re-exported: the names prepare and the tests use)
    CLASS_FOLDERS,
    ID_COLUMNS,
    IMAGE_EXTENSIONS,
    LABEL_COLUMNS,
    Reading,
    Source,
    parse_grade,
    parse_split,
    read_layout,
    reason_kind,
    resolve_image,
)
from aptos_ray.data.preprocess import ImageError, Photo, decode_photo, to_rgb_uint8
from aptos_ray.errors import DataError, DriverOnlyPathError, StorageError

PREPARE_READING = Reading(training=True, csv_names=("train.csv", "labels.csv"), input_key="prepare.input")


# ---------------------------------------------------------------- entry point


def read_source(cfg: PrepareConfig) -> Source:
    """Read ``cfg.input`` (a local path or URI) in whichever layout it has; ``DataError`` when it is unusable."""
    try:
        found = storage.file_type(cfg.input) != "NotFound"
    except StorageError:  # already one line naming the input: an endpoint that does not answer
        raise
    except OSError as e:  # a bucket that does not exist, no credentials, ...
        raise DataError(f"{cfg.input}: cannot read the input ({e})") from None
    if not found:
        raise DataError(f"{cfg.input}: input not found; set --prepare.input to a dataset folder, labels CSV or .npz")
    src = read_layout(cfg.input, Reading(**{**PREPARE_READING.__dict__, "images": cfg.images,
                                            "follow_symlinks": cfg.follow_symlinks}))
    check_usable(src, cfg.input)
    return src


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


def read_image(record: dict, min_side: int, max_pixels: int = 0, needed: int = 0) -> np.ndarray:
    """The record's image as uint8 RGB (``read_photo``'s pixels)."""
    return read_photo(record, min_side, max_pixels, needed).pixels


def read_photo(record: dict, min_side: int, max_pixels: int = 0, needed: int = 0) -> Photo:
    """The record's photograph, decoded at the size ``needed`` asks for (``preprocess.decode_photo``);
    ``ImageError`` for unusable files: tiny, huge (more than ``max_pixels``, read from the header
    before decoding) and blank (one uniform colour) included.

    The npz arrays (RetinaMNIST: 28 px) are exempt from ``min_side``: that check catches
    thumbnails and broken photographs, while an array dataset has a fixed, known resolution.
    """
    array = record.get("array")
    if array is not None:
        arr = check_not_blank(to_rgb_uint8(np.asarray(array)))
        return Photo(arr, *arr.shape[:2])
    photo = decode_photo(read_bytes(record), max_pixels, needed)
    if min(photo.height, photo.width) < min_side:  # the photograph's size, not the reduced decode's
        raise ImageError(f"tiny image: {photo.height}x{photo.width} < min_image_side {min_side}")
    check_not_blank(photo.pixels)
    return photo


def check_not_blank(arr: np.ndarray) -> np.ndarray:
    """A uniform image (all black, all grey: a failed capture or a placeholder) is no fundus photograph."""
    step = max(1, min(arr.shape[:2]) // 256)  # a subsample is enough to tell, and cheap on large images
    sample = np.ascontiguousarray(arr[::step, ::step]).reshape(-1, 1)
    std = float(cv2.meanStdDev(sample)[1][0, 0])  # NumPy's std, 2x faster: one pass, no float copy
    if std < BLANK_STD:
        raise ImageError(f"blank image: uniform pixels (std {std:.2f} < {BLANK_STD}), mean {arr.mean():.0f}")
    return arr


DRIVER_ONLY = "not on this node"  # the reason of a file only the driver's disk has


def read_bytes(record: dict) -> bytes:
    """The bytes of a record's file, read where this runs (a Ray task, on any node) through the
    filesystem of its path or URI. A local file the driver listed (``listed_on``) that is not
    there is ``DRIVER_ONLY`` when this process sees another disk (a node without the driver's
    files), and a "missing file" on the driver's own disk (removed since it was listed)."""
    source = str(record["source"])
    fs, inner = storage.filesystem(source)
    try:
        with fs.open_input_stream(inner) as f:
            return f.read()
    except FileNotFoundError:
        listed_on = record.get("listed_on")
        if listed_on and listed_on != storage.local_disk():
            raise ImageError(f"{DRIVER_ONLY}: {source}") from None
        raise ImageError("missing file") from None
    except OSError as e:
        raise ImageError(f"unreadable file: {e.strerror or e}") from None


def stop_on_driver_only_paths(reasons) -> None:
    """The driver's check of the reasons its tasks gave: a file the driver listed that a task's
    node could not see is no bad image but a cluster without shared storage. The job stops with
    one line (``DriverOnlyPathError``) instead of quarantining it as missing."""
    paths = [reason.split(": ", 1)[1] for reason in reasons if reason_kind(reason) == DRIVER_ONLY]
    if paths:
        raise DriverOnlyPathError(paths[0], len(paths) - 1)
