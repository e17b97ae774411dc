"""Prepare raw fundus data into the Parquet dataset that training reads.

    python jobs/prepare.py --prepare.input=../shared/data/aptos2019-224 --prepare.output=data/prepared/aptos
    python jobs/prepare.py --card-only --prepare.output=data/prepared/aptos
    ray job submit --working-dir . -- python jobs/prepare.py --config configs/....yaml

Connects to the running cluster when RAY_ADDRESS (or --scaling.address) is set, else starts Ray.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _cli import main  # noqa: E402


def prepare_job(cfg) -> None:
    print(cfg.summary())
    from aptos_ray.data.prepare import prepare  # imports Ray: only once the config is valid

    print(f"prepared dataset: {prepare(cfg)}")


if __name__ == "__main__":
    main(prepare_job)
