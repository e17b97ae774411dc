"""Which raw files are ours to read: not a link escaping the input, not our own outputs.

The README promises that paths escaping the input folder are quarantined: that is a question of
real paths (links followed), not of the strings. And a dataset or data card that prepare wrote
inside a class folder must not come back as grade-N images on the next prepare.
"""

from __future__ import annotations

import os


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
