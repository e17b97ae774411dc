"""Inference throughput: the Ray Data actor pool of predict.py vs a plain single-process loop.

    python benchmarks/bench_predict.py --limit 200
    python benchmarks/bench_predict.py --checkpoint runs/<run> --limit 733 --num-actors 4 --batch-size 32

Both sides do the same work per image with the same functions: read the raw file, preprocess it as
training did (``predict.load_rows``), and grade it (``predict.Grader``). Without --checkpoint an
untrained model of --model is saved in the checkpoint format (the speed does not depend on the
weights). Ray is started before the clock runs (reported apart); the Ray time includes starting the
actors and loading the model in each, as a real predict job pays it. Not a test: prints a table.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aptos_ray.config import Config  # noqa: E402
from aptos_ray.model.factory import create_model  # noqa: E402
from aptos_ray.train.checkpoint import prepare_config, read_checkpoint  # noqa: E402
from aptos_ray.infer.grader import Grader  # noqa: E402
from aptos_ray.infer.inputs import find_inputs  # noqa: E402
from aptos_ray.infer.predict import build_dataset, collect, load_rows  # noqa: E402
from aptos_ray.ray_setup import ray_progress  # noqa: E402
from aptos_ray.data.format import decode_batch  # noqa: E402
from bench_prepare import best_of  # noqa: E402  (the benchmarks folder is on sys.path)

DEFAULT_INPUT = Path(__file__).resolve().parents[2] / "shared" / "data" / "aptos2019-224"


def untrained_checkpoint(model: str, size: int, prepare_size: int, folder: Path) -> Path:
    """A model.pt in the training checkpoint format, with random weights."""
    cfg = Config()
    cfg.model.name, cfg.data.image_size, cfg.prepare.image_size = model, size, prepare_size
    cfg.model.pretrained, cfg.model.head = "none", "classification"
    state = {"model": create_model(cfg.model, load_pretrained=False).state_dict(), "config": cfg.to_dict(),
             "cut_points": None, "epoch": 0, "metrics": {}}
    path = folder / "model.pt"
    torch.save(state, path)
    return path


def raw_subset(source: Path, limit: int, folder: Path) -> Path:
    """A Kaggle-style folder with the first ``limit`` ids of ``source`` (the images are linked, not copied)."""
    labels = pd.read_csv(source / "labels.csv")
    if limit:
        labels = labels.head(limit)
    out = folder / "raw"
    out.mkdir()
    labels.to_csv(out / "test.csv", index=False)
    os.symlink((source / "images").resolve(), out / "test_images")
    return out


def plain_loop(checkpoint: str, items: list[dict], prepare: dict, batch_size: int) -> int:
    """The baseline: one process, the model loaded once, a for loop over batches."""
    grader = Grader(read_checkpoint(checkpoint), "cuda" if torch.cuda.is_available() else "cpu")
    done = 0
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        rows = load_rows({"source": np.array([i["source"] for i in chunk], dtype=object)}, prepare)
        ok = rows["reason"] == ""
        if ok.any():
            grader(decode_batch({k: rows[k][ok] for k in ("image", "height", "width")}))
        done += len(chunk)
    return done


def ray_pipeline(checkpoint: str, inputs, prepare, batch_size: int, num_actors: int) -> int:
    with ray_progress():
        ds = build_dataset(inputs, read_checkpoint(checkpoint), prepare, 0, batch_size, num_actors)
        return len(collect(ds))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", type=Path, default=DEFAULT_INPUT, help="folder with labels.csv + images/")
    parser.add_argument("--checkpoint", default="", help="run dir, checkpoint dir or model.pt (default: untrained --model)")
    parser.add_argument("--model", default="efficientnet_b0")
    parser.add_argument("--size", type=int, default=224, help="model input size (untrained checkpoint)")
    parser.add_argument("--prepare-size", type=int, default=256, help="preprocessed image size (untrained checkpoint)")
    parser.add_argument("--limit", type=int, default=200, help="images (0 = all)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-actors", type=int, default=2)
    parser.add_argument("--num-cpus", type=int, default=0, help="CPUs for the local Ray instance (0 = all)")
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()

    import ray

    with tempfile.TemporaryDirectory(prefix="bench-predict-") as tmp:
        checkpoint = args.checkpoint or str(untrained_checkpoint(args.model, args.size, args.prepare_size, Path(tmp)))
        loaded = read_checkpoint(checkpoint)
        inputs = find_inputs(str(raw_subset(args.input, args.limit, Path(tmp))), "test")
        prepare, _ = prepare_config(loaded)
        n = len(inputs.items)
        print(f"{n} images from {args.input}, model {loaded.config.model.name}, batch {args.batch_size}, "
              f"torch threads {torch.get_num_threads()}")

        plain = best_of(args.repeat, lambda: plain_loop(checkpoint, inputs.items, asdict(prepare), args.batch_size))
        t0 = time.perf_counter()
        ray.init(num_cpus=args.num_cpus or None, include_dashboard=False, log_to_driver=False)
        ray_start = time.perf_counter() - t0
        cpus = int(ray.cluster_resources().get("CPU", 0))
        pooled = best_of(args.repeat, lambda: ray_pipeline(checkpoint, inputs, prepare, args.batch_size, args.num_actors))
        ray.shutdown()

    print("\n## Results\n")  # benchmarks/run.py keeps what follows
    print(f"{n} images; Ray start-up ({ray_start:.1f} s) not counted, actor start-up and model loading counted\n")
    print("| pipeline | seconds | images/s | ratio |\n|---|---|---|---|")
    print(f"| plain loop (1 process, {torch.get_num_threads()} threads) | {plain:.2f} | {n / plain:.1f} | 1.00 |")
    print(f"| Ray Data actor pool ({args.num_actors} actors, {cpus} CPUs) | {pooled:.2f} | {n / pooled:.1f} "
          f"| {plain / pooled:.2f} |")

if __name__ == "__main__":
    main()
