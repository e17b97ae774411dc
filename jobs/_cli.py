"""Shared entry-point wrapper: parse the config, turn expected errors into one clear line."""

from __future__ import annotations

import sys
from collections.abc import Callable

from aptos_ray.config import Config, ConfigError, parse_args


def main(job: Callable[[Config], object], argv: list[str] | None = None) -> None:
    try:
        cfg = parse_args(argv)
        job(cfg)
    except (ConfigError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
