"""Write the evaluation report of a prediction run (labels needed).

    python jobs/evaluate.py --predict.output=outputs/predict

Reads <predict.output>/predictions.parquet (and predict.json for context); writes report.html
(self-contained), report.md, metrics.json and the PNG figures beside it.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _cli import main  # noqa: E402

from aptos_ray.infer.report import evaluate  # noqa: E402

if __name__ == "__main__":
    main(evaluate)
