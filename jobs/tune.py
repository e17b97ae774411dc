"""Search hyperparameters with Ray Tune + ASHA; every trial is a Ray Train DDP run.

    python jobs/tune.py [--config configs/X.yaml] [--key=value ...]             # local Ray instance
    python jobs/tune.py --tune.name=NAME --tune.resume=true                      # continue a stopped search
    ray job submit --working-dir . -- python jobs/tune.py ...                    # on a Ray cluster

Outputs under tune.output/tune.name: trials.csv, trials.md, best_config.yaml (train it with
`python jobs/train.py --config .../best_config.yaml`), qwk_per_epoch.png, runs/<trial_id>/.
Ctrl+C stops the search with its state saved (exit code 130); --tune.resume=true continues it.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _cli import main  # noqa: E402

from aptos_ray.tune.search import SearchFailed, SearchInterrupted, run_search  # noqa: E402

if __name__ == "__main__":
    try:
        main(run_search)
    except SearchInterrupted as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(130)
    except SearchFailed as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
