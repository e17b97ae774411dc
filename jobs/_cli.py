"""Shared entry-point wrapper: parse the config, print it, turn expected errors into one clear line.

Configuration and data problems, missing or taken paths and unusable weights exit with status 2 and
a one-line message naming the file or key, not a traceback; anything else (a built-in
FileNotFoundError included) is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

# `python jobs/X.py` puts jobs/ (not the checkout) on sys.path; under `ray job submit` the package
# may not be installed, so make the checkout importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aptos_ray.config import Config, ConfigError, parse_args  # noqa: E402
from aptos_ray.errors import ExistingFileError, MissingFileError  # noqa: E402
from aptos_ray.models import WeightsError  # noqa: E402
from aptos_ray.sources import DataError  # noqa: E402


def main(job: Callable[[Config], object], argv: list[str] | None = None) -> None:
    try:
        job(parse_args(argv))
    except (ConfigError, DataError, MissingFileError, ExistingFileError, WeightsError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
