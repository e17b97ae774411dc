"""Shared entry-point wrapper: parse the config, print it, turn expected errors into one clear line.

Configuration and data problems, missing or taken paths, unusable weights or checkpoints
(``aptos_ray.errors.UserError``) exit with status 2 and a one-line message naming the file or key,
not a traceback; anything else (a built-in FileNotFoundError included) is a bug and keeps its
traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

# `python jobs/X.py` puts jobs/ (not the checkout) on sys.path; under `ray job submit` the package
# may not be installed, so make the checkout importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aptos_ray.config import Config, parse_args  # noqa: E402
from aptos_ray.errors import UserError  # noqa: E402


def main(job: Callable[[Config], object], argv: list[str] | None = None) -> None:
    try:
        job(parse_args(argv))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
