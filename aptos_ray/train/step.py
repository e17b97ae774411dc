"""The training step and evaluation: plain PyTorch, no Ray.

Both take iterables of numpy row batches (``id, grade, image, height, width``) as they come
from Ray Data shards or from the local Parquet reader, so the Ray and the local runs share
every line here.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator

import numpy as np
import torch
from torchvision.transforms import v2
from tqdm import tqdm

from aptos_ray.data.format import decode_batch


class GradeTransforms:
    """uint8 NHWC images -> normalised float NCHW tensors at the model's input size.

    Size, mean and std come from the model (``models.model_data_config``). Augmentation is
    drawn per image: fundus photos have no canonical orientation, so any rotation and both
    flips are fair; a mild zoom and brightness/contrast cover camera and exposure variation.
    """

    def __init__(self, size: int, mean, std, augment: bool = True):
        self.size = size
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)
        self.augment = augment
        self.random = v2.Compose(
            [
                v2.RandomResizedCrop(size, scale=(0.85, 1.0), ratio=(0.9, 1.1), antialias=True),
                v2.RandomHorizontalFlip(),
                v2.RandomVerticalFlip(),
                v2.RandomRotation(180),
                v2.ColorJitter(brightness=0.2, contrast=0.2),
            ]
        )
        self.resize = v2.Resize((size, size), antialias=True)

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() / 255.0 - self.mean) / self.std

    def train(self, images: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
        if not self.augment:
            return self.eval(images)
        return self._normalise(torch.stack([self.random(img) for img in x]))

    def eval(self, images: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = self.resize(x)
        return self._normalise(x)


def fixed_step_minibatches(
    row_batches: Iterable[dict],
    batch_size: int,
    steps: int,
    seed: int,
    encoding: str = "raw",
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Exactly ``steps`` minibatches of (images uint8 NHWC, grades) from a stream of row batches.

    Every DDP rank must run the same number of steps or the all-reduce hangs, but resampled
    shards differ in length. So rows are shuffled within each incoming chunk, cut into
    minibatches, and if a shard runs dry early the last steps are drawn from the rows it has
    seen (a small, statistically harmless top-up). What is left after ``steps`` is drained
    unread so that the data iterator finishes its epoch on every rank.
    """
    rng = np.random.default_rng(seed)
    carry_images = carry_grades = None
    seen_images = seen_grades = None
    emitted = 0
    iterator = iter(row_batches)
    for batch in iterator:
        images = decode_batch(batch, encoding)
        grades = np.asarray(batch["grade"], dtype=np.int64)
        order = rng.permutation(len(grades))
        images, grades = images[order], grades[order]
        seen_images, seen_grades = images, grades
        if carry_images is not None:
            images = np.concatenate([carry_images, images])
            grades = np.concatenate([carry_grades, grades])
        start = 0
        while len(grades) - start >= batch_size and emitted < steps:
            yield images[start : start + batch_size], grades[start : start + batch_size]
            start += batch_size
            emitted += 1
        carry_images, carry_grades = images[start:], grades[start:]
        if emitted >= steps:
            break
    for _ in iterator:  # drain: see docstring
        pass
    if emitted < steps:
        if seen_grades is None:
            raise RuntimeError("this worker's training shard is empty: is the train split empty?")
        pool_images = np.concatenate([carry_images, seen_images])
        pool_grades = np.concatenate([carry_grades, seen_grades])
        while emitted < steps:
            pick = rng.integers(0, len(pool_grades), batch_size)
            yield pool_images[pick], pool_grades[pick]
            emitted += 1


def autocast(device: torch.device, enabled: bool):
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def train_one_epoch(
    model: torch.nn.Module,
    minibatches: Iterable[tuple[np.ndarray, np.ndarray]],
    transforms: GradeTransforms,
    loss_fn,
    optimizer: torch.optim.Optimizer,
    scheduler,
    device: torch.device,
    scaler: torch.amp.GradScaler | None = None,
    amp: bool = False,
    channels_last: bool = False,
    steps: int | None = None,
    progress: bool = False,
    description: str = "train",
    progress_bar=tqdm,
) -> dict:
    """One pass over ``minibatches``; returns mean loss, images and images/s.

    ``progress_bar`` is a tqdm-like class (Ray workers pass Ray's, which draws in the driver).
    """
    model.train()
    total_loss, images_seen, start = 0.0, 0, time.perf_counter()
    grade_counts = np.zeros(5, dtype=np.int64)
    bar = progress_bar(minibatches, total=steps, desc=description) if progress else minibatches
    for images, grades in bar:
        x = transforms.train(images).to(device, non_blocking=True)
        if channels_last and device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        y = torch.from_numpy(grades).to(device)
        with autocast(device, amp):
            loss = loss_fn(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None and scaler.is_enabled():
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
        total_loss += loss.item() * len(grades)
        images_seen += len(grades)
        grade_counts += np.bincount(grades, minlength=5)[:5]
        if progress:
            bar.set_description(f"{description} loss {loss.item():.3f}")
    if progress:
        bar.close()
    seconds = time.perf_counter() - start
    return {
        "train_loss": total_loss / max(images_seen, 1),
        "train_images": images_seen,
        "images_per_s": images_seen / max(seconds, 1e-9),
        "train_grade_counts": grade_counts.tolist(),  # what the weighted sampling delivered
    }


@torch.no_grad()
def predict_outputs(
    model: torch.nn.Module,
    row_batches: Iterable[dict],
    transforms: GradeTransforms,
    device: torch.device,
    batch_size: int = 64,
    encoding: str = "raw",
    amp: bool = False,
    progress: bool = False,
) -> tuple[torch.Tensor, np.ndarray, list[str]]:
    """Model outputs (float32, on CPU), grades and ids for every row, in stream order."""
    model.eval()
    outputs, grades, ids = [], [], []
    for batch in tqdm(row_batches, desc="eval", disable=not progress, leave=False):
        images = decode_batch(batch, encoding)
        for start in range(0, len(images), batch_size):
            x = transforms.eval(images[start : start + batch_size]).to(device)
            with autocast(device, amp):
                outputs.append(model(x).float().cpu())
        grades.append(np.asarray(batch["grade"], dtype=np.int64))
        ids.extend(str(i) for i in batch["id"])
    if not outputs:
        return torch.zeros(0, 1), np.zeros(0, dtype=np.int64), []
    return torch.cat(outputs), np.concatenate(grades), ids
