"""Prepare raw fundus data (Kaggle folder, image folders, labels CSV, RetinaMNIST .npz) into the
Parquet dataset that training reads, with seeded stratified splits, a quarantine and a data card.

    python jobs/prepare.py --help        # examples and every key, type, default
    ray job submit --working-dir . -- python jobs/prepare.py [--config FILE.yaml] [--key=value ...]

The job itself is `aptos_ray.cli.JOBS["prepare"]` (also `aptos-ray prepare` once installed).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _cli import main  # noqa: E402

if __name__ == "__main__":
    main("prepare")
