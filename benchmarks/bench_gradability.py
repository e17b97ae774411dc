"""Gradability verdicts (aptos_ray/infer/quality.py): how many real photographs they flag, and how
many known degradations they catch.

    python benchmarks/bench_gradability.py                  # all 2,929 shared photographs, 300 degraded
    python benchmarks/bench_gradability.py --degrade 100 --synthetic 50

1. Every photograph of the shared APTOS folder is assessed: the share flagged, by reason. APTOS
   photographs were graded by ophthalmologists, so nearly all are gradable; a verdict that flags
   many of them is too strict.
2. A seeded sample of them is degraded in known ways (``quality.degrade``: blur, under/over
   exposure, crops, shrinking), where the expected verdict is known: the detection rate per
   degradation, and how often the expected reason was the one given. "mild" variants are
   borderline on purpose and have no expected verdict: their flagged share shows where the
   thresholds sit.
3. The statistics behind each threshold: percentiles on the real photographs and on the
   degradation the threshold is for (how the thresholds were chosen).
4. The synthetic generator's photographs (``synthetic.render_fundus``) and their degradations.
5. Cost: assessing a photograph vs reading and preprocessing it (what predict's row loading does
   anyway), per image, measured side by side.

Not a test: prints Markdown tables after a '## Results' line (benchmarks/run.py keeps those).
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aptos_ray.config import PrepareConfig  # noqa: E402
from aptos_ray.data.preprocess import load_image, preprocess  # noqa: E402
from aptos_ray.data.synthetic import render_fundus  # noqa: E402
from aptos_ray.infer.quality import DEFAULT_THRESHOLDS, assess  # noqa: E402
from benchmarks.degradations import DEGRADATIONS, degrade  # noqa: E402

SHARED = ROOT.parent / "shared" / "data" / "aptos2019-224"
# statistic, threshold, the degradation it is meant to catch, which side is bad
THRESHOLD_ROWS = [
    ("quality_brightness", "min_brightness", "dark", "below"),
    ("quality_brightness", "max_brightness", "bright", "above"),
    ("quality_saturated", "max_saturated", "bright", "above"),
    ("quality_diameter", "min_diameter", "small", "below"),
    ("quality_coverage", "min_coverage", "crop_half", "below"),
    ("quality_sharpness", "min_sharpness", "blur", "below"),
]


def read(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def assess_rows(images: dict[str, np.ndarray], kind: str) -> list[dict]:
    rows = []
    for id_, img in images.items():
        rows.append({"id": id_, "kind": kind, **assess(degrade(img, kind) if kind != "original" else img).columns()})
    return rows


def pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


def shared_table(frame: pd.DataFrame) -> str:
    n = len(frame)
    counts = collections.Counter(frame["quality_reason"])
    lines = ["| photographs | gradable | flagged | flagged by reason |", "|---|---|---|---|"]
    reasons = ", ".join(f"{r}: {c}" for r, c in counts.most_common() if r) or "none"
    lines.append(f"| {n} | {counts['']} ({pct(counts[''], n)}) | {n - counts['']} ({pct(n - counts[''], n)}) | {reasons} |")
    return "\n".join(lines)


def degradation_table(frame: pd.DataFrame) -> str:
    lines = ["| degradation | expected verdict | images | flagged | expected reason | other reasons |",
             "|---|---|---|---|---|---|"]
    for kind, expected in [("original", ""), *DEGRADATIONS.items()]:
        rows = frame[frame["kind"] == kind]
        n = len(rows)
        if not n:
            continue
        counts = collections.Counter(rows["quality_reason"])
        flagged = n - counts[""]
        right = "-" if expected is None else pct(counts[expected], n) if expected else pct(counts[""], n)
        others = ", ".join(f"{r}: {c}" for r, c in counts.most_common() if r and r != expected) or "-"
        label = "gradable" if expected == "" else "(borderline)" if expected is None else expected
        lines.append(f"| {kind} | {label} | {n} | {pct(flagged, n)} | {right} | {others} |")
    return "\n".join(lines)


def threshold_table(frame: pd.DataFrame) -> str:
    lines = ["| statistic | threshold | real: p1 / p5 / p50 / p95 / p99 | degradation: p5 / p50 / p95 |",
             "|---|---|---|---|"]
    real = frame[frame["kind"] == "original"]
    for column, name, kind, side in THRESHOLD_ROWS:
        value = getattr(DEFAULT_THRESHOLDS, name)
        r = np.nanpercentile(real[column].astype(float), [1, 5, 50, 95, 99])
        d = np.nanpercentile(frame[frame["kind"] == kind][column].astype(float), [5, 50, 95])
        digits = {"quality_saturated": 3, "quality_coverage": 2}.get(column, 0)
        fmt = lambda v, digits=digits: f"{v:.{digits}f}"  # noqa: E731
        lines.append(f"| {column.removeprefix('quality_')} | {name} = {value} ({side}: bad) | "
                     f"{' / '.join(fmt(v) for v in r)} | {kind}: {' / '.join(fmt(v) for v in d)} |")
    return "\n".join(lines)


def cost_table(paths: list[Path]) -> str:
    """Per image: read + preprocess (the row loading predict does) vs the quality assessment."""
    cfg = PrepareConfig(image_size=256)
    load_s = assess_s = 0.0
    for path in paths:
        t0 = time.perf_counter()
        arr = load_image(path)
        preprocess(arr, cfg)
        t1 = time.perf_counter()
        assess(arr)
        t2 = time.perf_counter()
        load_s, assess_s = load_s + t1 - t0, assess_s + t2 - t1
    n = len(paths)
    return "\n".join(["| images | read + preprocess ms/img | assess ms/img | assess / (read + preprocess) |",
                      "|---|---|---|---|",
                      f"| {n} | {1000 * load_s / n:.1f} | {1000 * assess_s / n:.1f} | {assess_s / load_s:.2f}x |"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, default=SHARED, help="a folder with labels.csv and images/")
    parser.add_argument("--degrade", type=int, default=300, help="photographs degraded in every way")
    parser.add_argument("--synthetic", type=int, default=100, help="synthetic photographs (256 px)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    paths = sorted((args.images / "images").glob("*.png"))
    if not paths:
        sys.exit(f"{args.images}: no images/*.png")
    started = time.perf_counter()
    originals = {p.stem: read(p) for p in paths}
    rows = assess_rows(originals, "original")
    rng = np.random.default_rng(args.seed)
    sample = {p.stem: originals[p.stem] for p in rng.choice(paths, min(args.degrade, len(paths)), replace=False)}
    for kind in DEGRADATIONS:
        rows += assess_rows(sample, kind)
    frame = pd.DataFrame(rows)
    synthetic = {f"syn{i}": render_fundus(i % 5, rng, 256) for i in range(args.synthetic)}
    syn_rows = assess_rows(synthetic, "original")
    for kind in DEGRADATIONS:
        syn_rows += assess_rows(synthetic, kind)
    cost = cost_table(list(rng.choice(paths, 200, replace=False)))
    flagged = frame[(frame["kind"] == "original") & (frame["quality_reason"] != "")]
    print(f"flagged real photographs: {', '.join(f'{r.id} ({r.quality_reason})' for r in flagged.itertuples())}")
    print(f"{time.perf_counter() - started:.0f} s")

    print("\n## Results\n")  # benchmarks/run.py keeps what follows
    print(f"Shared APTOS folder ({args.images.name}), every photograph:\n")
    print(shared_table(frame[frame["kind"] == "original"]))
    print(f"\nDegraded copies of {len(sample)} of them (seed {args.seed}):\n")
    print(degradation_table(frame))
    print("\nThe statistics behind the thresholds:\n")
    print(threshold_table(frame))
    print(f"\nSynthetic generator, {args.synthetic} photographs at 256 px:\n")
    print(degradation_table(pd.DataFrame(syn_rows)))
    print("\nCost per photograph (224 px inputs):\n")
    print(cost)


if __name__ == "__main__":
    main()
