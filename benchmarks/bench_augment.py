"""Batched augmentation: the old per-image torchvision loop vs torchvision v2 on a batch vs kornia vs the
project's hand-written batched affine (aptos_ray.train.augment), one CPU core, 224 px.

    python benchmarks/bench_augment.py [--batch 32] [--stored 224 256] [--repeats 7]

kornia is not a dependency (not adopted): `pip install kornia` adds its row.

Every candidate does the same work: random resized crop (scale 0.85-1, ratio 0.9-1.1), both flips,
rotation up to 180 degrees, brightness/contrast 0.2, resize to 224, normalise; from a uint8 NHWC batch
to float NCHW. `per-image params` is checked, not assumed: a batch of one image repeated must come out
as different images. The old loop (``PerImageTransforms``, the project's path before issue 14) is kept
here as the reference it is measured against.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torchvision.transforms import v2

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aptos_ray.train.augment import GradeTransforms  # noqa: E402

SIZE = 224
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
APTOS = ROOT.parent / "shared" / "data" / "aptos2019-224"


class PerImageTransforms:
    """The project's augmentation before issue 14: torchvision v2, one image at a time, on the CPU."""

    def __init__(self, size: int, mean, std, augment: bool = True):
        self.size = size
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)
        self.augment = augment
        self.random = v2.Compose([
            v2.RandomResizedCrop(size, scale=(0.85, 1.0), ratio=(0.9, 1.1), antialias=True),
            v2.RandomHorizontalFlip(), v2.RandomVerticalFlip(), v2.RandomRotation(180),
            v2.ColorJitter(brightness=0.2, contrast=0.2),
        ])
        self.resize = v2.Resize((size, size), antialias=True)

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() / 255.0 - self.mean) / self.std

    def train(self, images) -> torch.Tensor:
        if not self.augment:
            return self.eval(images)
        x = torch.as_tensor(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
        return self._normalise(torch.stack([self.random(img) for img in x]))

    def eval(self, images) -> torch.Tensor:
        x = torch.as_tensor(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = self.resize(x)
        return self._normalise(x)


class V2Batched:
    """torchvision v2 on the whole batch tensor: fast, but one random draw for the batch."""

    def __init__(self):
        self.random = v2.Compose([
            v2.RandomResizedCrop(SIZE, scale=(0.85, 1.0), ratio=(0.9, 1.1), antialias=True),
            v2.RandomHorizontalFlip(), v2.RandomVerticalFlip(), v2.RandomRotation(180),
            v2.ColorJitter(brightness=0.2, contrast=0.2),
            v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD),
        ])

    def train(self, images) -> torch.Tensor:
        return self.random(torch.as_tensor(images).permute(0, 3, 1, 2))


class Kornia:
    """kornia.augmentation on the batch: per-image parameters (same_on_batch=False)."""

    def __init__(self):
        import kornia.augmentation as K

        self.random = K.AugmentationSequential(
            K.RandomResizedCrop((SIZE, SIZE), scale=(0.85, 1.0), ratio=(0.9, 1.1), p=1.0),
            K.RandomHorizontalFlip(), K.RandomVerticalFlip(), K.RandomRotation(180.0, p=1.0),
            K.ColorJitter(brightness=0.2, contrast=0.2, p=1.0),
            K.Normalize(mean=torch.tensor(MEAN), std=torch.tensor(STD)),
        )

    def train(self, images) -> torch.Tensor:
        return self.random(torch.as_tensor(images).permute(0, 3, 1, 2).float() / 255)


def per_image_params(tf, image: np.ndarray, n: int = 8) -> bool:
    """Do copies of one image in a batch come out different (each drew its own parameters)?"""
    torch.manual_seed(0)
    out = tf.train(np.repeat(image[None], n, axis=0))
    return bool(all((out[i] - out[0]).abs().max() > 1e-3 for i in range(1, n)))


def images_per_s(candidates: dict, batch: np.ndarray, repeats: int) -> dict[str, float]:
    """Best of ``repeats`` per candidate, timed in turns (round-robin) so that load on a shared machine
    falls on every candidate alike."""
    best = {name: float("inf") for name in candidates}
    for tf in candidates.values():
        tf.train(batch)  # warm-up
    for _ in range(repeats):
        for name, tf in candidates.items():
            start = time.perf_counter()
            tf.train(batch)
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: len(batch) / seconds for name, seconds in best.items()}


def sample_batch(n: int, stored: int) -> np.ndarray:
    """n real APTOS images resized to ``stored`` px (random pixels when the shared folder is absent)."""
    from PIL import Image

    files = sorted((APTOS / "images").glob("*.png"))[:n]
    if len(files) < n:
        return np.random.default_rng(0).integers(0, 256, (n, stored, stored, 3), dtype=np.uint8)
    return np.stack([np.asarray(Image.open(f).convert("RGB").resize((stored, stored))) for f in files])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--stored", nargs="+", type=int, default=[224, 256])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)  # per core
    candidates = {
        "old: torchvision v2, per-image loop": PerImageTransforms(SIZE, MEAN, STD),
        "torchvision v2 on the batch": V2Batched(),
        # not a project dependency: `pip install kornia` to compare
        **({"kornia on the batch": Kornia()} if importlib.util.find_spec("kornia") else {}),
        "train.augment (one affine grid_sample per batch)": GradeTransforms(SIZE, MEAN, STD),
    }
    rows = []
    for stored in args.stored:
        batch = sample_batch(args.batch, stored)
        rates = images_per_s(candidates, batch, args.repeats)
        base = next(iter(rates.values()))
        for name, tf in candidates.items():
            rows.append((name, stored, rates[name], rates[name] / base, per_image_params(tf, batch[0])))
    print("\n## Results\n")  # benchmarks/run.py keeps what follows
    print(f"1 CPU core (torch threads 1), batch {args.batch}, output {SIZE} px, best of {args.repeats} taken in turns\n")
    print("| augmentation | stored px | img/s per core | ratio to old | per-image params |\n|---|---|---|---|---|")
    for name, stored, rate, ratio, per_image in rows:
        print(f"| {name} | {stored} | {rate:.0f} | {ratio:.2f} | {'yes' if per_image else 'NO: one draw per batch'} |")


if __name__ == "__main__":
    main()
