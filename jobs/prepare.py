"""Prepare raw fundus data into the Parquet dataset that training reads.

    python jobs/prepare.py --prepare.input=../shared/data/aptos2019-224 --prepare.output=data/prepared/aptos
    ray job submit --working-dir . -- python jobs/prepare.py --config configs/....yaml

Connects to the running cluster when RAY_ADDRESS (or --scaling.address) is set, else starts Ray.
Configuration and data problems exit with status 2 and a one-line message, not a traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path

# `python jobs/prepare.py` puts jobs/ (not the checkout) on sys.path; under `ray job submit`
# the package may not be installed, so make the checkout importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aptos_ray.config import ConfigError, parse_args  # noqa: E402
from aptos_ray.sources import DataError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_args(argv)
        print(cfg.summary())
        from aptos_ray.prepare import prepare  # imports Ray: only once the config is valid

        output = prepare(cfg)
    except (ConfigError, DataError) as e:
        print(f"prepare: error: {e}", file=sys.stderr)
        return 2
    print(f"prepared dataset: {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
