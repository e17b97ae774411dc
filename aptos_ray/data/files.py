"""Which files of a raw input prepare may read: not a link escaping the input, not our own outputs.

The README promises that paths escaping the input folder are quarantined: that is a question of
real paths (links followed), not of the strings. And a dataset or data card that prepare wrote
inside a class folder must not come back as grade-N images on the next prepare.
"""

from __future__ import annotations

import os
from pathlib import Path


def escape_reason(path: Path, root: Path) -> str:
    """A quarantine reason when ``path``, links followed, is not inside ``root`` (else ""): a symlink
    to a file elsewhere is not part of the input, whatever its name says."""
    real, root_real = os.path.realpath(path), os.path.realpath(root)
    if os.path.commonpath([root_real, real]) != root_real:
        return f"path escapes the input folder: {path} -> {real}"
    return ""


def is_own_output(folder: Path) -> bool:
    """A prepared dataset (manifest.json) or a data card (card/README.md): what prepare writes."""
    return (folder / "manifest.json").is_file() or (folder.name == "card" and (folder / "README.md").is_file())


def input_files(folder: Path, skipped: list[str]) -> list[Path]:
    """Every non-hidden file below ``folder``, sorted, except inside our own outputs (noted in
    ``skipped``): a dataset prepared into a class folder must not come back as grade-N images.
    Hidden folders (a writer's ``.NAME.tmp-*`` staging) are skipped too; links to folders are not followed."""
    files = []
    for root, dirs, names in os.walk(folder):
        here = Path(root)
        if is_own_output(here):
            skipped.append(str(here))
            dirs[:] = []
            continue
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        files += [here / n for n in names if not n.startswith(".")]
    return sorted(files)
