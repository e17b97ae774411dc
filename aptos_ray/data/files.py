"""Which raw files are ours to read: the file an id names, not a link escaping the input (on
request), not our own outputs.

Links out of the input folder are followed by default; ``prepare.follow_symlinks=false`` quarantines
them (untrusted inputs): a question of real paths (links followed), not of the strings. Ids that
climb out of the image folder (``../x``) are always refused. And a dataset or data card that prepare wrote
inside a class folder must not come back as grade-N images on the next prepare.
"""

from __future__ import annotations

import os
import posixpath

from aptos_ray import storage

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


def escape_reason(path: str, root: str) -> str:
    """A quarantine reason when the local ``path``, links followed, is not inside ``root`` (else ""):
    a symlink to a file elsewhere is not part of the input, whatever its name says."""
    real, root_real = os.path.realpath(path), os.path.realpath(root)
    if os.path.commonpath([root_real, real]) != root_real:
        return f"path escapes the input folder: {path} -> {real}"
    return ""


def is_own_output(folder_name: str, files: set[str]) -> bool:
    """A prepared dataset (manifest.json) or a data card (card/README.md), from a folder's name and
    file names: what prepare writes."""
    return "manifest.json" in files or (folder_name == "card" and "README.md" in files)


def resolve_image(images: str, id_: str, listing: set[str], folded: dict[str, str] | None = None) -> tuple[str | None, str]:
    """(path, "") or (None, reason) for an id: without extension (tries .png/.jpg/.jpeg) or with one.
    ``folded`` (lower-cased name -> name of the listing) lets a missing file name the file whose
    name differs only in case (``x.png`` asked, ``x.PNG`` there)."""
    if id_ == "" or id_.startswith("/") or "\\" in id_:
        return None, "id escapes the image folder" if id_ else "empty id"
    inside = posixpath.normpath(id_)
    if inside == ".." or inside.startswith("../"):
        return None, "id escapes the image folder"
    if "/" not in inside:  # the common case: a directory listing instead of a request per candidate
        extensions = (*IMAGE_EXTENSIONS, *(ext.upper() for ext in IMAGE_EXTENSIONS))
        for name in (inside, *(inside + ext for ext in extensions)):
            if name in listing:
                return storage.join(images, name), ""
        return None, "missing file" + _case_hint(inside, folded or {})
    for candidate in (inside, *(inside + ext for ext in IMAGE_EXTENSIONS)):
        if storage.file_type(storage.join(images, candidate)) == "File":
            return storage.join(images, candidate), ""
    return None, "missing file"


def _case_hint(name: str, folded: dict[str, str]) -> str:
    """': x.PNG exists (the name differs only in case)' when the folder holds such a file, else ''."""
    for candidate in (name, *(name + ext for ext in IMAGE_EXTENSIONS)):
        found = folded.get(candidate.lower())
        if found is not None:
            return f": {found} exists (the name differs only in case)"
    return ""
