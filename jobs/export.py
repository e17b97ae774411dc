"""Export a checkpoint to ONNX (dynamic batch), checked against PyTorch with onnxruntime.

    python jobs/export.py --predict.checkpoint=runs/<run> --predict.output=outputs/export

Writes model.onnx and model.json (input size, mean, std, cut-points, head, fundus preprocessing,
parity result). Exits with status 1 when the ONNX outputs differ from PyTorch's.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _cli import main  # noqa: E402

from aptos_ray.infer.export import ExportError, export  # noqa: E402


def job(cfg) -> None:
    try:
        export(cfg)
    except ExportError as e:
        print(f"export: error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main(job)
