"""GPU training throughput, for when a GPU machine is at hand (nothing here runs without CUDA).

    python benchmarks/bench_gpu.py [--models efficientnet_b0 efficientnet_b1 efficientnet_b2 efficientnet_b3]
                                   [--sizes 224 384] [--batch 64] [--steps 30]

For each model and size: training images/s with mixed precision and channels_last (the settings
the trainer uses on GPU) on synthetic in-memory batches, GPU utilisation sampled with nvidia-smi,
peak GPU memory, and whether the data pipeline keeps up: the project's per-batch augmentation on
the CPU (images/s per core) against the GPU's appetite.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aptos_ray.config import ModelConfig  # noqa: E402
from aptos_ray.train.step import GradeTransforms  # noqa: E402
from aptos_ray.model.factory import create_model  # noqa: E402


def gpu_utilisation(samples: list[int], stop: threading.Event) -> None:
    while not stop.is_set():
        out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.strip():
            samples.append(int(out.stdout.split()[0]))
        time.sleep(0.2)


def train_rate(name: str, size: int, batch: int, steps: int) -> dict:
    device = torch.device("cuda")
    model = create_model(ModelConfig(name=name, pretrained="none", head="classification")).to(device).to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cuda")
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 5, (batch,), device=device)
    torch.cuda.reset_peak_memory_stats()
    samples, stop = [], threading.Event()
    for step in range(steps + 5):
        if step == 5:
            torch.cuda.synchronize()
            start = time.perf_counter()
            watcher = threading.Thread(target=gpu_utilisation, args=(samples, stop), daemon=True)
            watcher.start()
        with torch.autocast("cuda", dtype=torch.float16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    stop.set()
    return {"model": name, "size": size, "batch": batch, "images_per_s": steps * batch / seconds,
            "gpu_util_mean": float(np.mean(samples)) if samples else None,
            "peak_gpu_memory_gb": torch.cuda.max_memory_allocated() / 2**30}


def augmentation_rate(size: int, batch: int) -> float:
    """Images/s one CPU core turns from stored uint8 images into augmented tensors."""
    torch.set_num_threads(1)
    tf = GradeTransforms(size, (0.5,) * 3, (0.5,) * 3, augment=True)
    images = np.random.randint(0, 255, (batch, size + size // 8, size + size // 8, 3), dtype=np.uint8)
    tf.train(images)
    start = time.perf_counter()
    for _ in range(3):
        tf.train(images)
    return 3 * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+",
                        default=["efficientnet_b0", "efficientnet_b1", "efficientnet_b2", "efficientnet_b3"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[224, 384])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "out" / "bench_gpu.json"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_gpu.py needs CUDA: run it on a GPU machine")
    cpu = {size: augmentation_rate(size, 32) for size in args.sizes}
    rows = [train_rate(m, s, args.batch, args.steps) for m in args.models for s in args.sizes]
    print("\n## Results\n")  # benchmarks/run.py keeps what follows
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, AMP fp16 + channels_last, batch {args.batch}\n")
    print("| model | px | train img/s | GPU util % | peak GPU GB | CPU cores to feed it |\n|---|---|---|---|---|---|")
    for r in rows:
        r["cpu_cores_needed"] = r["images_per_s"] / cpu[r["size"]]
        util = f"{r['gpu_util_mean']:.0f}" if r["gpu_util_mean"] is not None else "-"
        print(f"| {r['model']} | {r['size']} | {r['images_per_s']:.0f} | {util} | {r['peak_gpu_memory_gb']:.1f} | "
              f"{r['cpu_cores_needed']:.1f} |")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"augmentation_images_per_s_per_core": cpu, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
