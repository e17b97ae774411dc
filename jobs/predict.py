"""Grade fundus photographs with a trained checkpoint (Ray Data actor pool).

    python jobs/predict.py --predict.checkpoint=runs/<run> --predict.images=<kaggle folder | image folder | prepared dataset>
    python jobs/predict.py ... --predict.split=val --predict.tta=3 --predict.output=outputs/predict
    python jobs/predict.py ... --predict.explain=8     # + Grad-CAM overlays in <output>/explain/

Writes submission.csv (Kaggle format), predictions.parquet (with a gradable / quality_reason verdict per
image), unreadable.csv and predict.json (+ quality_flagged.png when some images are ungradable); when the
inputs have known grades, also the evaluation report (report.html, report.md, metrics.json).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout, under `ray job submit`

from _cli import main  # noqa: E402

from aptos_ray.infer.predict import predict  # noqa: E402

if __name__ == "__main__":
    main(predict)
