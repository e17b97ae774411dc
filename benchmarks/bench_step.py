"""The CPU training step, this checkout against another one (the code before a change to the step).

    python benchmarks/bench_step.py --old ../main [--model tf_efficientnet_lite0] [--size 96]
                                    [--batch 16] [--steps 8] [--rounds 3]

Each round times one epoch of ``train_one_epoch`` (augmentation on the CPU, forward, backward,
AdamW) in a fresh process per checkout, old and new in turns (alternating which goes first), on the same in-memory batches, so
load from other processes falls on both alike. Reported: images/s per checkout (median of the
rounds) and new / old. A CPU step has no queue to keep full, so what this guards is that moving the
loss sum and the augmentation parameters around for the GPU's sake costs the CPU nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def one_epoch(model_name: str, size: int, batch: int, steps: int) -> float:
    """Images/s of one epoch of ``steps`` steps, after one untimed warm-up epoch (this process)."""
    import numpy as np
    import torch

    from aptos_ray.config import ModelConfig
    from aptos_ray.model.factory import create_model
    from aptos_ray.model.heads import get_head
    from aptos_ray.train.augment import GradeTransforms
    from aptos_ray.train.step import train_one_epoch

    torch.manual_seed(0)
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    model = create_model(ModelConfig(name=model_name, pretrained="none", head="regression"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    rng = np.random.default_rng(0)
    batches = [(rng.integers(0, 256, (batch, size + size // 4, size + size // 4, 3), dtype=np.uint8),
                rng.integers(0, 5, batch)) for _ in range(steps)]
    transforms = GradeTransforms(size, (0.5,) * 3, (0.25,) * 3)
    loss = get_head("regression").loss()
    cpu = torch.device("cpu")
    train_one_epoch(model, batches[:2], transforms, loss, optimizer, None, cpu, steps=2)
    start = time.perf_counter()
    train_one_epoch(model, batches, transforms, loss, optimizer, None, cpu, steps=steps)
    return batch * steps / (time.perf_counter() - start)


def measure(repo: Path, args) -> float:
    command = [sys.executable, __file__, "--worker", "--model", args.model, "--size", str(args.size),
               "--batch", str(args.batch), "--steps", str(args.steps)]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    out = subprocess.run(command, env=env, cwd=repo, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["images_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old", required=False, help="the other checkout (its aptos_ray is imported)")
    parser.add_argument("--model", default="tf_efficientnet_lite0")
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps({"images_per_s": one_epoch(args.model, args.size, args.batch, args.steps)}))
        return
    old = Path(args.old).resolve()
    rates: dict[str, list[float]] = {"old": [], "new": []}
    for round_ in range(args.rounds):
        # old first in even rounds, new first in odd ones: load that drifts falls on both alike
        for which in (("old", "new") if round_ % 2 == 0 else ("new", "old")):
            rates[which].append(measure(old if which == "old" else ROOT, args))
        print(f"old {rates['old'][-1]:.1f} img/s, new {rates['new'][-1]:.1f} img/s", flush=True)
    old_rate, new_rate = statistics.median(rates["old"]), statistics.median(rates["new"])
    print("\n## Results\n")
    print(f"{args.model}, {args.size} px, batch {args.batch}, {args.steps} steps per epoch, CPU, "
          f"{os.environ.get('BENCH_THREADS', '2')} threads, median of {args.rounds} rounds in turns\n")
    print("| step | old img/s | new img/s | new / old | rounds new / old |\n|---|---|---|---|---|")
    per_round = ", ".join(f"{n / o:.2f}" for o, n in zip(rates["old"], rates["new"]))
    print(f"| train_one_epoch (CPU) | {old_rate:.1f} | {new_rate:.1f} | {new_rate / old_rate:.2f} | {per_round} |")


if __name__ == "__main__":
    main()
