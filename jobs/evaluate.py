"""Write the evaluation report of a prediction run (report.html, report.md, metrics.json, figures).

    python jobs/evaluate.py --help        # examples and every key, type, default
    ray job submit --working-dir . -- python jobs/evaluate.py [--config FILE.yaml] [--key=value ...]

The job itself is `aptos_ray.cli.JOBS["evaluate"]` (also `aptos-ray evaluate` once installed).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _cli import main  # noqa: E402

if __name__ == "__main__":
    main("evaluate")
