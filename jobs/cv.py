"""K-fold cross-validation: one training run per fold of data.folds (Ray Tune trials over data.fold, or
one after another with --local); every image is predicted once by the model that did not train on it;
QWK cut-points and a referral threshold (cv.target_sensitivity) are chosen on those predictions.
Writes cv.json, cv.md, oof.parquet and the fold runs under cv.output/cv.name.

    python jobs/cv.py --config configs/quality.yaml --data.dataset=data/prepared/aptos
    python jobs/cv.py --help        # examples and every key, type, default
    python jobs/predict.py --predict.checkpoint=cv_runs/NAME --predict.images=...   # the fold ensemble

The job itself is `aptos_ray.cli.JOBS["cv"]` (also `aptos-ray cv` once installed).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _cli import main  # noqa: E402

if __name__ == "__main__":
    main("cv")
