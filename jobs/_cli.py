"""Shared entry point of jobs/*.py (kept for `ray job submit --working-dir . -- python jobs/X.py`).

Everything else is in ``aptos_ray/cli.py``, which the ``aptos-ray`` console script runs too: the
same parsing, validation, --help and one-line errors.
"""

from __future__ import annotations

import sys
from pathlib import Path

# `python jobs/X.py` puts jobs/ (not the checkout) on sys.path; under `ray job submit` the package
# may not be installed, so make the checkout importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aptos_ray.cli import run_job  # noqa: E402


def main(job: str, argv: list[str] | None = None) -> None:
    run_job(job, argv)
