"""Data throughput: images/s delivered to the training loop, the project's pipeline against the seed's.

    python benchmarks/bench_data.py [--images 300] [--full-size 1536]

- seed: torchvision ``ImageFolder`` over the image files, decoding and resizing every image every
  epoch (Resize 224, flips, rotation, ToTensor, Normalize), ``DataLoader`` with 2 worker processes.
- aptos-ray: the prepared Parquet dataset (decoded, cropped and resized once by prepare) through a
  materialised Ray Data dataset, weighted resampling and the same augmentation, as the trainer sees it.

On the shared APTOS files (224 px) and on full-size synthetic fundus photos (the originals APTOS
ships are ~2-3k px; none are at hand, so the generator makes them). Epoch 2 is timed; prepare's
one-off cost is reported beside it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import pandas as pd
import torch
from torchvision import datasets, transforms

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aptos_ray.config import SyntheticConfig, parse_args  # noqa: E402
from aptos_ray.train.step import GradeTransforms, fixed_step_minibatches  # noqa: E402
from aptos_ray.data.format import read_manifest  # noqa: E402
from aptos_ray.train.sampling import repeat_rates, resample_batches  # noqa: E402

OUT = ROOT / "benchmarks" / "out" / "bench-data"
APTOS = ROOT.parent / "shared" / "data" / "aptos2019-224"
MEAN, STD, SIZE, BATCH = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 224, 30


def class_folders(labels: pd.DataFrame, images: Path, out: Path) -> Path:
    """ImageFolder layout (symlinks, nothing copied) for the seed's loader."""
    if out.exists():
        shutil.rmtree(out)
    for row in labels.itertuples():
        (out / str(row.diagnosis)).mkdir(parents=True, exist_ok=True)
        (out / str(row.diagnosis) / f"{row.id_code}.png").symlink_to(images / f"{row.id_code}.png")
    return out


def seed_loader_rate(folder: Path, epochs: int = 2) -> float:
    tf = transforms.Compose([
        transforms.Resize((SIZE, SIZE)), transforms.RandomHorizontalFlip(), transforms.RandomRotation(30),
        transforms.ToTensor(), transforms.Normalize(MEAN, STD),
    ])
    loader = torch.utils.data.DataLoader(datasets.ImageFolder(str(folder), tf), batch_size=BATCH, shuffle=True,
                                         num_workers=2, persistent_workers=True)
    for epoch in range(epochs):
        start, seen = time.perf_counter(), 0
        for x, _ in loader:
            seen += len(x)
    return seen / (time.perf_counter() - start)


def project_rate(dataset: Path, epochs: int = 2) -> float:
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    manifest = read_manifest(str(dataset))
    counts = {int(g): n for g, n in manifest["counts"]["train"].items()}
    ds = ray.data.read_parquet(str(dataset / "train"), columns=["id", "grade", "image", "height", "width"]).materialize()
    tf = GradeTransforms(SIZE, MEAN, STD, augment=True)
    steps = sum(counts.values()) // BATCH
    for epoch in range(epochs):
        start, seen = time.perf_counter(), 0
        rows = resample_batches(ds.iter_batches(batch_size=256, batch_format="numpy"),
                                repeat_rates(counts, "inverse"), 0, epoch)
        for images, _ in fixed_step_minibatches(rows, BATCH, steps, seed=epoch):
            seen += len(tf.train(images))
    return seen / (time.perf_counter() - start)


def prepare_once(raw_csv: Path, images: Path, out: Path) -> float:
    from aptos_ray.data.prepare import prepare

    start = time.perf_counter()
    prepare(parse_args([f"--prepare.input={raw_csv}", f"--prepare.images={images}", f"--prepare.output={out}",
                        f"--prepare.image_size={SIZE}", "--prepare.val_fraction=0.0", "--prepare.test_fraction=0.0",
                        "--prepare.card=false"]))
    return time.perf_counter() - start


def case(name: str, labels: pd.DataFrame, images: Path) -> dict:
    work = OUT / name
    work.mkdir(parents=True, exist_ok=True)
    labels.to_csv(work / "labels.csv", index=False)
    prep_seconds = prepare_once(work / "labels.csv", images, work / "prepared")
    seed = seed_loader_rate(class_folders(labels, images, work / "folders"))
    ours = project_rate(work / "prepared")
    return {"input": name, "images": len(labels), "seed_images_per_s": seed, "aptos_ray_images_per_s": ours,
            "ratio": ours / seed, "prepare_seconds_once": prep_seconds}


def full_size_images(n: int, size: int) -> tuple[pd.DataFrame, Path]:
    from aptos_ray.data.synthetic import generate

    raw = generate(SyntheticConfig(output=str(OUT / f"synthetic-{size}"), num_images=n, image_size=size, seed=1))
    return pd.read_csv(raw / "train.csv"), raw / "train_images"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--full-size", type=int, default=1536)
    parser.add_argument("--json", default=str(OUT.parent / "bench_data.json"))
    args = parser.parse_args()
    labels = pd.read_csv(APTOS / "labels.csv").sample(args.images, random_state=0)
    rows = [case("APTOS files, 224 px", labels, APTOS / "images")]
    full_labels, full_images = full_size_images(args.images // 2, args.full_size)
    rows.append(case(f"synthetic full-size, {args.full_size} px", full_labels, full_images))
    print("\n## Results\n")  # benchmarks/run.py keeps what follows
    print("| input | images | seed ImageFolder img/s | aptos-ray img/s | ratio | prepare once (s) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['input']} | {r['images']} | {r['seed_images_per_s']:.1f} | {r['aptos_ray_images_per_s']:.1f} | "
              f"{r['ratio']:.1f}x | {r['prepare_seconds_once']:.1f} |")
    Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
