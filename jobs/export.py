"""Export a checkpoint to ONNX (dynamic batch), checked against PyTorch with onnxruntime; exit status
1 when the outputs differ.

    python jobs/export.py --help        # examples and every key, type, default
    ray job submit --working-dir . -- python jobs/export.py [--config FILE.yaml] [--key=value ...]

The job itself is `aptos_ray.cli.JOBS["export"]` (also `aptos-ray export` once installed).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _cli import main  # noqa: E402

if __name__ == "__main__":
    main("export")
