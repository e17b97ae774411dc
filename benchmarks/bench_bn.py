"""BatchNorm under DDP with small per-worker batches: local statistics vs frozen vs SyncBatchNorm.

    python benchmarks/bench_bn.py [--size 128] [--epochs 3] [--batches 8 4]

The default recipe (pretrained Lite0, regression head) on the shared APTOS folder, same split,
budget and global batch everywhere. The reference is one process with the whole batch (BatchNorm
sees 2 x batch images); the DDP runs split that batch over 2 TorchTrainer workers, so each
BatchNorm sees only ``batch`` images. SyncBatchNorm runs on GPU workers only (torch's limit): on a
machine with fewer than 2 GPUs its row says so; with 2 or more, every DDP row runs on GPUs.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from quality import OUT, prepared, train_and_score  # noqa: E402


def setups(batch: int) -> dict[str, list[str]]:
    ddp = ["--scaling.num_workers=2", "--scaling.cpus_per_worker=1", f"--train.batch_size={batch}"]
    return {
        f"1 process, batch {2 * batch}, BatchNorm (reference)": ["--local", f"--train.batch_size={2 * batch}"],
        f"1 process, batch {2 * batch}, frozen BatchNorm": ["--local", f"--train.batch_size={2 * batch}",
                                                            "--model.batch_norm=frozen"],
        f"2 workers x batch {batch}, local BatchNorm": [*ddp, "--model.batch_norm=local"],
        f"2 workers x batch {batch}, frozen BatchNorm": [*ddp, "--model.batch_norm=frozen"],
        f"2 workers x batch {batch}, SyncBatchNorm": [*ddp, "--model.batch_norm=sync"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batches", type=int, nargs="+", default=[8], help="per-worker batch sizes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=str(OUT / "bench_bn.json"))
    args = parser.parse_args()
    dataset = prepared("aptos", args.size)
    rows = {}
    every_setup = {label: mode for batch in args.batches for label, mode in setups(batch).items()}
    on_gpus = torch.cuda.device_count() >= 2  # one GPU per DDP worker: then every DDP row uses them
    for label, mode in every_setup.items():
        if "--model.batch_norm=sync" in mode and not on_gpus:
            rows[label] = {"skipped": "needs 2 GPU workers (torch's SyncBatchNorm does not run on CPU)"}
            continue
        if on_gpus and "--local" not in mode:
            mode = [*mode, "--scaling.use_gpu=true"]
        run_args = [*mode, f"--data.dataset={dataset}", f"--data.image_size={args.size}",
                    f"--train.epochs={args.epochs}", f"--train.seed={args.seed}", f"--train.output={OUT / 'runs'}",
                    f"--train.name=bn-{re.sub('[^a-z0-9]+', '-', label.lower())}{int(time.time())}",
                    "--train.progress=false"]
        rows[label] = train_and_score(run_args, dataset)
        print(f"{label}: {json.dumps({k: rows[label][k] for k in ('val_qwk', 'test_qwk', 'images_per_s')})}",
              flush=True)
    print("\n## Results\n")  # benchmarks/run.py keeps what follows
    print(f"APTOS {args.size}px, {args.epochs} epochs, default recipe (pretrained Lite0, regression), "
          f"seed {args.seed}\n")
    print("| setup | best val QWK | test QWK | test acc | test kappa | images/s | peak memory per worker (MB) "
          "| minutes |\n|---|---|---|---|---|---|---|---|")
    for label, r in rows.items():
        if "skipped" in r:
            print(f"| {label} | {r['skipped']} | | | | | | |")
            continue
        print(f"| {label} | {r['val_qwk']:.3f} | {r['test_qwk']:.3f} | {r['test_acc']:.3f} | {r['test_kappa']:.3f} "
              f"| {r['images_per_s']:.1f} | {', '.join(map(str, r['peak_memory_mb']))} | {r['minutes']} |")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
