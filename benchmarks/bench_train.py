"""Training throughput: Ray Train's TorchTrainer against a plain single-process PyTorch loop.

    python benchmarks/bench_train.py [--model efficientnet_b0] [--size 64] [--batch 16] [--images 400]

Same model, batch, image size and CPU threads everywhere. The plain loop keeps decoded images in
memory and runs transform -> forward -> backward -> step; the project's runs go through the whole
pipeline (Parquet -> Ray Data shard -> weighted resampling -> augmentation). Figures are images/s of
the second epoch (the first one warms up), as ratios to the plain loop, plus peak memory per worker.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aptos_ray.config import ModelConfig, parse_args  # noqa: E402
from aptos_ray.data.format import decode_batch, read_split, table_batches  # noqa: E402
from aptos_ray.model.factory import create_model, model_data_config  # noqa: E402
from aptos_ray.train.augment import GradeTransforms  # noqa: E402
from aptos_ray.train.driver import train  # noqa: E402
from aptos_ray.train.loop import peak_memory_mb  # noqa: E402

OUT = ROOT / "benchmarks" / "out"
APTOS = ROOT.parent / "shared" / "data" / "aptos2019-224"


def dataset(images: int, size: int) -> Path:
    out = OUT / f"bench-train-{images}-{size}"
    if not (out / "manifest.json").is_file():
        from aptos_ray.data.prepare import prepare

        prepare(parse_args([f"--prepare.input={APTOS}", f"--prepare.output={out}", f"--prepare.limit={images}",
                            f"--prepare.image_size={size}", "--prepare.card=false"]))
    return out


def plain_loop(data: Path, model_name: str, size: int, batch: int, threads: int, steps: int) -> dict:
    """The baseline: nothing but the PyTorch work of a training step."""
    torch.set_num_threads(threads)
    images = decode_batch(next(table_batches(read_split(str(data), "train"), 10_000)))
    model = create_model(ModelConfig(name=model_name, pretrained="none", head="classification"))
    cfg = model_data_config(model)
    transforms = GradeTransforms(size, cfg["mean"], cfg["std"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    grades = torch.randint(0, 5, (batch,))
    model.train()
    done, start = 0, 0.0
    for step in range(steps + 3):
        if step == 3:  # warm-up steps are not timed
            start, done = time.perf_counter(), 0
        pick = torch.randint(0, len(images), (batch,)).numpy()
        loss = torch.nn.functional.cross_entropy(model(transforms.train(images[pick])), grades)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        done += batch
    return {"images_per_s": done / (time.perf_counter() - start), "peak_memory_mb": [round(peak_memory_mb())]}


def project_run(data: Path, model_name: str, size: int, batch: int, mode: list[str], name: str) -> dict:
    args = [f"--data.dataset={data}", f"--model.name={model_name}", "--model.pretrained=none",
            f"--data.image_size={size}",
            f"--train.batch_size={batch}", "--train.epochs=2", f"--train.output={OUT / 'bench-train-runs'}",
            f"--train.name={name}-{int(time.time())}", "--train.progress=false", *mode]
    summary = train(parse_args(args))
    second = [json.loads(line) for line in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()][-1]
    return {"images_per_s": second["images_per_s"], "peak_memory_mb": second["peak_memory_mb"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="efficientnet_b0")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--json", default=str(OUT / "bench_train.json"))
    args = parser.parse_args()
    data = dataset(args.images, args.size)
    steps = max(5, int(args.images * 0.7) // args.batch)
    rows = {"plain PyTorch loop, 2 threads": plain_loop(data, args.model, args.size, args.batch, 2, steps)}
    runs = {
        "aptos-ray --local (1 process)": ["--local"],
        "TorchTrainer 1 worker x 2 CPU": ["--scaling.num_workers=1", "--scaling.cpus_per_worker=2"],
        "TorchTrainer 2 workers x 1 CPU": ["--scaling.num_workers=2", "--scaling.cpus_per_worker=1"],
    }
    for label, mode in runs.items():
        rows[label] = project_run(data, args.model, args.size, args.batch, mode, label.split()[0].lower())
    base = rows["plain PyTorch loop, 2 threads"]["images_per_s"]
    print("\n## Results\n")  # benchmarks/run.py keeps what follows
    print(f"{args.model}, {args.size}px, batch {args.batch} per worker, {torch.get_num_threads()} cores\n")
    print("| setup | images/s | ratio to plain loop | peak memory per worker (MB) |\n|---|---|---|---|")
    for label, r in rows.items():
        r["ratio"] = r["images_per_s"] / base
        print(f"| {label} | {r['images_per_s']:.1f} | {r['ratio']:.2f} | {', '.join(map(str, r['peak_memory_mb']))} |")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
