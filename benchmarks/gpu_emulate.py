"""A Python environment that has only what the borrowed GPU machine has (for rehearsing the GPU check).

    python benchmarks/gpu_emulate.py SOURCE_SITE_PACKAGES DEST_VENV

DEST_VENV is a fresh venv (made with this machine's python3) whose site-packages sees, through one
``site.addsitedir``, links to the packages of SOURCE_SITE_PACKAGES named in
benchmarks/gpu_machine_packages.txt (the machine's package list, .library/device/KINDS.md) and
nothing else: no Ray, no tensorboardX, no pydantic, as there. Only the rehearsal uses it
(benchmarks/gpu_rehearse.sh); it installs nothing.
"""

from __future__ import annotations

import csv
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


# Not on that machine's list, but what this machine's huggingface-hub (imported by timm) needs; the
# machine's own hub version works without it.
EMULATION_ONLY = {"httpcore2", "httpx2", "truststore"}


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def top_level_entries(dist_info: Path) -> set[str]:
    """The site-packages entries a distribution installed (its RECORD), e.g. {'torch', 'torch-2.14.dist-info'}."""
    record = dist_info / "RECORD"
    entries = {dist_info.name}
    if record.is_file():
        with record.open(newline="") as f:
            for row in csv.reader(f):
                first = row[0].split("/")[0] if row else ""
                if first and first != ".." and not first.endswith(".data"):
                    entries.add(first)
    return entries


def main() -> None:
    source, dest = Path(sys.argv[1]), Path(sys.argv[2])
    wanted = {normalise(line) for line in (HERE / "gpu_machine_packages.txt").read_text().split() if line}
    wanted |= EMULATION_ONLY
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(dest)], check=True)
    site_dir = dest / "machine-site"
    site_dir.mkdir()
    linked: set[str] = set()
    for dist_info in sorted(source.glob("*.dist-info")):
        name = normalise(dist_info.name.removesuffix(".dist-info").rsplit("-", 1)[0])
        if name not in wanted:
            continue
        for entry in top_level_entries(dist_info) - linked:
            if (source / entry).exists() and entry != "__pycache__":
                (site_dir / entry).symlink_to(source / entry)
                linked.add(entry)
    (venv_site,) = dest.glob("lib/python3*/site-packages")
    (venv_site / "gpu_machine.pth").write_text(f"import site; site.addsitedir({str(site_dir)!r})\n")
    print(f"{dest}: {len(linked)} entries of {len(wanted)} listed packages linked from {source}")


if __name__ == "__main__":
    main()
