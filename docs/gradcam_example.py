"""Rebuild docs/gradcam_example.png: Grad-CAM overlays of synthetic grade 3-4 photographs.

    python docs/gradcam_example.py --checkpoint runs/<run trained on the synthetic default>

Synthetic photographs (aptos_ray.synthetic), not APTOS ones: the shared data may not be committed.
Top row: the photograph as preprocessed for the model; bottom row: its Grad-CAM overlay.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aptos_ray.data.preprocess import preprocess  # noqa: E402
from aptos_ray.data.synthetic import render_fundus  # noqa: E402
from aptos_ray.figures import overlay  # noqa: E402
from aptos_ray.infer.explain import Explainer  # noqa: E402
from aptos_ray.train.checkpoint import prepare_config, read_checkpoint  # noqa: E402
from aptos_ray.infer.grader import Grader  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--grades", type=int, nargs="+", default=[3, 3, 4, 4])
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--output", default=str(Path(__file__).with_name("gradcam_example.png")))
    args = parser.parse_args()
    checkpoint = read_checkpoint(args.checkpoint)
    prepare, _ = prepare_config(checkpoint)
    grader = Grader(checkpoint)
    rng = np.random.default_rng(args.seed)
    images = np.stack([preprocess(render_fundus(g, rng, 256), prepare) for g in args.grades])
    graded = grader(images)
    maps = Explainer(grader).heatmaps(images)
    print("grades", args.grades, "predicted", graded["predicted"].tolist(), "scores", graded["score"].round(2).tolist())
    columns = [np.vstack([img, overlay(img, m)]) for img, m in zip(images, maps)]
    gap = np.full((columns[0].shape[0], 4, 3), 255, np.uint8)
    sheet = np.hstack([c for col in columns for c in (col, gap)][:-1])
    Image.fromarray(sheet).save(args.output, optimize=True)
    print(f"wrote {args.output} ({Path(args.output).stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
