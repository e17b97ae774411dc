"""Search hyperparameters with Ray Tune + ASHA; every trial is a Ray Train run. Writes trials.csv,
trials.md, best_config.yaml and qwk_per_epoch.png under tune.output/tune.name. Ctrl+C stops the
search with its state saved (exit status 130); --tune.resume=true continues it.

    python jobs/tune.py --help        # examples and every key, type, default
    ray job submit --working-dir . -- python jobs/tune.py [--config FILE.yaml] [--key=value ...]

The job itself is `aptos_ray.cli.JOBS["tune"]` (also `aptos-ray tune` once installed).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _cli import main  # noqa: E402

if __name__ == "__main__":
    main("tune")
