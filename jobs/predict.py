"""Grade fundus photographs with a trained checkpoint (Ray Data actor pool): submission.csv,
predictions.parquet, predict.json, and the evaluation report when the grades are known.

    python jobs/predict.py --predict.checkpoint=runs/<run> --predict.images=<kaggle folder | image folder | prepared dataset>
    python jobs/predict.py ... --predict.split=val --predict.tta=3 --predict.output=outputs/predict
    python jobs/predict.py ... --predict.explain=8     # + Grad-CAM overlays in <output>/explain/

Writes submission.csv (Kaggle format), predictions.parquet (with a gradable / quality_reason verdict per
image), unreadable.csv and predict.json (+ quality_flagged.png when some images are ungradable); when the
inputs have known grades, also the evaluation report (report.html, report.md, metrics.json).

    python jobs/predict.py --help        # examples and every key, type, default
    ray job submit --working-dir . -- python jobs/predict.py [--config FILE.yaml] [--key=value ...]

The job itself is `aptos_ray.cli.JOBS["predict"]` (also `aptos-ray predict` once installed).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _cli import main  # noqa: E402

if __name__ == "__main__":
    main("predict")
