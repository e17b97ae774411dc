"""Train a DR grader with Ray Train (DDP over scaling.num_workers workers) or --local in one process.
With no --data.dataset it trains on the embedded synthetic default, generated on first use.

    python jobs/train.py --help        # examples and every key, type, default
    ray job submit --working-dir . -- python jobs/train.py [--config FILE.yaml] [--key=value ...]

The job itself is `aptos_ray.cli.JOBS["train"]` (also `aptos-ray train` once installed).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _cli import main  # noqa: E402

if __name__ == "__main__":
    main("train")
