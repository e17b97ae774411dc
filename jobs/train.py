"""Train a DR grader.

    python jobs/train.py [--config configs/X.yaml] [--key=value ...]      # local Ray instance
    python jobs/train.py --local ...                                        # no Ray, one process
    ray job submit --working-dir . -- python jobs/train.py ...              # on a Ray cluster
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _cli import main  # noqa: E402

from aptos_ray.train.driver import train  # noqa: E402

if __name__ == "__main__":
    main(train)
