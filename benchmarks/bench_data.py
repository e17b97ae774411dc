"""Data throughput: images/s delivered to the training loop, the project's data paths against the seed's.

    python benchmarks/bench_data.py [--images 300] [--full-size 1536] [--train-steps 6] [--end-to-end-only]

Per CPU core (torch threads 1, one DataLoader worker), on the same images, the paths taking turns
epoch by epoch (best of 3 each: the machine may be shared):
- seed: torchvision ``ImageFolder`` over the image files, decoding and resizing every image every
  epoch (Resize 224, flips, rotation, ToTensor, Normalize), ``DataLoader`` with 1 worker process.
- old: the prepared Parquet dataset (decoded, cropped and resized once by prepare) through a
  materialised Ray Data dataset and weighted resampling, augmented image by image with torchvision
  v2 on the CPU (the project's path before issue 14).
- new, GPU worker: the same rows cut into one uint8 batch tensor per step (``prefetch_to_device``):
  all the CPU does when augmentation runs on the GPU.
- new, CPU worker: the same plus the batched augmentation (``aptos_ray.train.augment``) on the CPU.
On the shared APTOS files (224 px) and on full-size synthetic fundus photos (the originals APTOS
ships are ~2-3k px; none are at hand, so the generator makes them). Prepare's one-off cost is
reported beside it.

Then end to end: epochs of the ``--local`` training loop on the CPU with the old and the new data path
(same model, data, steps and cores), taking turns; images per wall second and per CPU second.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torchvision import datasets, transforms

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_augment import PerImageTransforms  # noqa: E402

from aptos_ray.config import ModelConfig, SyntheticConfig, parse_args  # noqa: E402
from aptos_ray.data.format import read_manifest  # noqa: E402
from aptos_ray.train.augment import GradeTransforms, prefetch_to_device  # noqa: E402
from aptos_ray.train.sampling import repeat_rates, resample_batches  # noqa: E402
from aptos_ray.train.step import fixed_step_minibatches  # noqa: E402

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


def seed_loader(folder: Path) -> torch.utils.data.DataLoader:
    tf = transforms.Compose([
        transforms.Resize((SIZE, SIZE)), transforms.RandomHorizontalFlip(), transforms.RandomRotation(30),
        transforms.ToTensor(), transforms.Normalize(MEAN, STD),
    ])
    return torch.utils.data.DataLoader(datasets.ImageFolder(str(folder), tf), batch_size=BATCH, shuffle=True,
                                       num_workers=1, persistent_workers=True)


PATHS = {
    "old": "old: per-image torchvision v2 on the CPU",
    "gpu_worker": "new, GPU worker: uint8 batches (augmentation on the GPU)",
    "cpu_worker": "new, CPU worker: uint8 batches + batched augmentation on the CPU",
}


def project_epoch(ds, counts: dict, path: str, epoch: int) -> int:
    """One epoch of a path (see ``PATHS``) from the materialised Ray Data dataset to the loop; images."""
    tf = PerImageTransforms(SIZE, MEAN, STD) if path == "old" else GradeTransforms(SIZE, MEAN, STD)
    rows = resample_batches(ds.iter_batches(batch_size=256, batch_format="numpy"),
                            repeat_rates(counts, "inverse"), 0, epoch)
    minibatches = fixed_step_minibatches(rows, BATCH, sum(counts.values()) // BATCH, seed=epoch)
    seen = 0
    if path == "old":  # as train_one_epoch ran before: numpy batches, augmented on the CPU
        for images, _ in minibatches:
            seen += len(tf.train(images))
        return seen
    for images, _, _ in prefetch_to_device(minibatches, torch.device("cpu"), depth=2):
        seen += len(tf.train(images) if path == "cpu_worker" else images)
    return seen


def delivery_rates(dataset: Path, folder: Path, rounds: int = 3) -> dict[str, float]:
    """Best epoch of ``rounds`` per path, the paths taking turns (load on a shared machine hits all alike)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    counts = {int(g): n for g, n in read_manifest(str(dataset))["counts"]["train"].items()}
    ds = ray.data.read_parquet(str(dataset / "train"), columns=["id", "grade", "image", "height", "width"]).materialize()
    loader = seed_loader(folder)
    best = {"seed": 0.0, **{path: 0.0 for path in PATHS}}
    for epoch in range(rounds):
        start = time.perf_counter()
        seen = sum(len(x) for x, _ in loader)
        best["seed"] = max(best["seed"], seen / (time.perf_counter() - start))
        for path in PATHS:
            start = time.perf_counter()
            seen = project_epoch(ds, counts, path, epoch)
            best[path] = max(best[path], seen / (time.perf_counter() - start))
    return best


def prepare_once(raw_csv: Path, images: Path, out: Path) -> float:
    from aptos_ray.data.prepare import prepare

    start = time.perf_counter()
    prepare(parse_args([f"--prepare.input={raw_csv}", f"--prepare.images={images}", f"--prepare.output={out}",
                        f"--prepare.image_size={SIZE}", "--prepare.val_fraction=0.1", "--prepare.test_fraction=0.0",
                        "--prepare.card=false"]))
    return time.perf_counter() - start


def case(name: str, labels: pd.DataFrame, images: Path) -> dict:
    work = OUT / name
    work.mkdir(parents=True, exist_ok=True)
    labels.to_csv(work / "labels.csv", index=False)
    prep_seconds = prepare_once(work / "labels.csv", images, work / "prepared")
    rates = delivery_rates(work / "prepared", class_folders(labels, images, work / "folders"))
    return {"input": name, "images": len(labels), "prepare_seconds_once": prep_seconds, **rates}


def training_rates(dataset: Path, model_name: str, steps: int, rounds: int) -> dict[str, dict]:
    """Training epochs of the ``--local`` loop (``train_one_epoch``) with the old and the new data path,
    taking turns: images per wall second and per CPU second of the process (every thread; robust on a
    shared machine), and the share of the epoch spent waiting for batches. Medians after a warm-up round."""
    from aptos_ray.data.format import read_split, table_batches
    from aptos_ray.model.factory import create_model, model_data_config
    from aptos_ray.model.heads import get_head
    from aptos_ray.train.step import Training, train_one_epoch

    table = read_split(str(dataset), "train")
    model = create_model(ModelConfig(name=model_name, pretrained="none", head="regression"))
    cfg = model_data_config(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn = get_head("regression", 5).loss(None, 0.0)
    paths = {"old": (PerImageTransforms(SIZE, cfg["mean"], cfg["std"]), 0),  # as before: no prefetch thread
             "new": (GradeTransforms(SIZE, cfg["mean"], cfg["std"]), 2)}
    runs: dict[str, list] = {path: [] for path in paths}
    for epoch in range(rounds + 1):
        for path, (tf, prefetch) in paths.items():
            batches = fixed_step_minibatches(table_batches(table, 256), 16, steps, seed=epoch)
            cpu, wall = time.process_time(), time.perf_counter()
            stats = train_one_epoch(Training(model, tf, loss_fn, optimizer), batches, prefetch=prefetch)
            if epoch:  # the first round warms up
                runs[path].append((stats["train_images"] / (time.perf_counter() - wall),
                                   stats["train_images"] / (time.process_time() - cpu), stats["data_wait_share"]))
    return {path: dict(zip(("images_per_s", "images_per_cpu_s", "data_wait_share"), np.median(v, axis=0)))
            for path, v in runs.items()}


def full_size_images(n: int, size: int) -> tuple[pd.DataFrame, Path]:
    from aptos_ray.data.synthetic import generate

    raw = generate(SyntheticConfig(output=str(OUT / f"synthetic-{size}"), num_images=n, image_size=size, seed=1))
    return pd.read_csv(raw / "train.csv"), raw / "train_images"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--full-size", type=int, default=1536)
    parser.add_argument("--train-steps", type=int, default=6, help="steps per epoch of the end-to-end runs")
    parser.add_argument("--train-models", nargs="+", default=["tf_efficientnet_lite0", "test_efficientnet"])
    parser.add_argument("--train-rounds", type=int, default=3)
    parser.add_argument("--end-to-end-only", action="store_true", help="skip the delivery table")
    parser.add_argument("--json", default=str(OUT.parent / "bench_data.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)  # per core
    labels = pd.read_csv(APTOS / "labels.csv").sample(args.images, random_state=0)
    rows = []
    if not args.end_to_end_only:
        rows.append(case("APTOS files, 224 px", labels, APTOS / "images"))
        full_labels, full_images = full_size_images(args.images // 2, args.full_size)
        rows.append(case(f"synthetic full-size, {args.full_size} px", full_labels, full_images))
    torch.set_num_threads(2)  # end to end: the machine's cores, as training runs
    prepared = OUT / "APTOS files, 224 px" / "prepared"
    if not (prepared / "manifest.json").is_file():
        prepare_once_labels = OUT / "APTOS files, 224 px"
        prepare_once_labels.mkdir(parents=True, exist_ok=True)
        labels.to_csv(prepare_once_labels / "labels.csv", index=False)
        prepare_once(prepare_once_labels / "labels.csv", APTOS / "images", prepared)
    trained = {m: training_rates(prepared, m, args.train_steps, args.train_rounds) for m in args.train_models}
    print("\n## Results\n")  # benchmarks/run.py keeps what follows
    if rows:
        print(f"Images/s per CPU core delivered to the training loop, {SIZE} px, batch {BATCH}, best of 3 epochs "
              "taken in turns\n")
        print("| input | images | seed ImageFolder | " + " | ".join(PATHS.values()) + " | new GPU worker / old | "
              "new CPU worker / old | new CPU worker / seed | prepare once (s) |")
        print("|---|---|---|" + "---|" * len(PATHS) + "---|---|---|---|")
        for r in rows:
            print(f"| {r['input']} | {r['images']} | {r['seed']:.0f} | " + " | ".join(f"{r[p]:.0f}" for p in PATHS)
                  + f" | {r['gpu_worker'] / r['old']:.1f}x | {r['cpu_worker'] / r['old']:.1f}x | "
                  f"{r['cpu_worker'] / r['seed']:.1f}x | {r['prepare_seconds_once']:.1f} |")
        print()
    print(f"End to end: training epochs of the --local loop on the CPU, 2 threads, {SIZE} px, batch 16, "
          f"{args.train_steps} steps, old and new data path taking turns, median of {args.train_rounds}\n")
    print("| model | old img/s | new img/s | new / old | old img per CPU-s | new img per CPU-s | new / old (CPU) | "
          "waiting for data, old / new |\n|---|---|---|---|---|---|---|---|")
    for m, t in trained.items():
        old, new = t["old"], t["new"]
        print(f"| {m} | {old['images_per_s']:.1f} | {new['images_per_s']:.1f} | "
              f"{new['images_per_s'] / old['images_per_s']:.2f} | {old['images_per_cpu_s']:.2f} | "
              f"{new['images_per_cpu_s']:.2f} | {new['images_per_cpu_s'] / old['images_per_cpu_s']:.2f} | "
              f"{old['data_wait_share']:.0%} / {new['data_wait_share']:.0%} |")
    Path(args.json).write_text(json.dumps({"delivery": rows, "training": trained}, indent=2, default=float))


if __name__ == "__main__":
    main()
