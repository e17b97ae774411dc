"""The training step and evaluation: plain PyTorch, no Ray.

Both take iterables of numpy row batches (``id, grade, image, height, width``) as they come
from Ray Data shards or from the local Parquet reader, so the Ray and the local runs share
every line here. The CPU only cuts rows into uint8 batches; augmentation runs batched on the
model's device (``train.augment``). ``repeatable`` and ``epoch_seed`` (at the end) hold a CPU run
still, so that the same seed gives the same weights.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from aptos_ray.data.format import decode_batch
from aptos_ray.train.augment import GradeTransforms, prefetch_to_device, to_device


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


PROGRESS_EVERY = 10  # steps between the progress bar's loss readings
STARTUP_STEPS = 2  # an epoch's first steps wait for the data path to start and for cuDNN to pick kernels

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(precision: str, device: torch.device) -> str:
    """The arithmetic a run uses on ``device``: ``bf16``, ``fp16`` or ``fp32`` (``train.precision``).

    Mixed precision is for GPUs: on the CPU it is always fp32 (CPU autocast is slower than fp32 on
    most CPUs, and fp16 has no CPU scaler). ``auto`` takes bf16 where the GPU computes it natively: it
    has fp32's exponent range, so no loss scaling and no skipped steps; older GPUs get fp16 with a
    GradScaler.
    """
    if precision == "fp32" or device.type != "cuda":
        return "fp32"
    native = native_bf16(device)
    if precision == "auto":
        return "bf16" if native else "fp16"
    if precision == "bf16" and not native:
        major, minor = torch.cuda.get_device_capability(device)
        raise ValueError(f"train.precision=bf16 but this GPU (compute capability {major}.{minor}) has no "
                         "native bfloat16 (8.0 or higher): use train.precision=auto or fp16")
    return precision


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 in hardware: compute capability 8.0 (Ampere) or higher.

    ``torch.cuda.is_bf16_supported()`` also counts emulation, which a T4 or V100 has: there bf16
    runs several times slower than fp16, so it is not what ``auto`` should pick.
    """
    return torch.cuda.get_device_capability(device) >= (8, 0)


def grad_scaler(precision: str) -> torch.amp.GradScaler:
    """Loss scaling for fp16 only (its narrow range underflows small gradients); a no-op otherwise."""
    return torch.amp.GradScaler("cuda", enabled=precision == "fp16")


def autocast(device: torch.device, precision: str):
    """Autocast to the resolved precision's dtype on a GPU; nothing for fp32 or on the CPU."""
    if precision in AUTOCAST_DTYPES and device.type == "cuda":
        return torch.autocast("cuda", dtype=AUTOCAST_DTYPES[precision])
    return contextlib.nullcontext()


@dataclass
class Training:
    """What every optimizer step of a run uses, built once (``train.loop.build_run``)."""

    model: torch.nn.Module
    transforms: GradeTransforms
    loss_fn: Callable
    optimizer: torch.optim.Optimizer
    scheduler: Any = None  # stepped after every optimizer step
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    scaler: torch.amp.GradScaler | None = None  # fp16 loss scaling
    precision: str = "fp32"  # resolved: bf16, fp16 or fp32
    channels_last: bool = False


def train_one_epoch(t: Training, minibatches: Iterable[tuple[np.ndarray, np.ndarray]], steps: int | None = None,
                    progress: bool = False, description: str = "train", progress_bar=tqdm, prefetch: int = 2) -> dict:
    """One pass over ``minibatches`` (uint8 NHWC images, grades); returns mean loss, images, images/s,
    ``steady_images_per_s`` (after the first ``STARTUP_STEPS`` steps: what longer epochs approach)
    and ``data_wait_share``, the part of the epoch spent waiting for the next batch.

    ``prefetch`` batches are readied by a background thread while the current one computes.
    ``progress_bar`` is a tqdm-like class (Ray workers pass Ray's, which draws in the driver).
    """
    model, device, optimizer, scaler = t.model, t.device, t.optimizer, t.scaler
    model.train()
    # The loss is summed on the device and read once, at the end: reading it each step (``.item()``)
    # makes the CPU wait for the GPU, so it cannot queue the next step meanwhile.
    total_loss, images_seen, waited, start = torch.zeros((), device=device), 0, 0.0, time.perf_counter()
    grade_counts = np.zeros(5, dtype=np.int64)
    batches = prefetch_to_device(minibatches, device, prefetch)
    bar = progress_bar(batches, total=steps, desc=description) if progress else batches
    iterator = iter(bar)
    steady_start, steady_images, step = start, 0, 0
    while True:
        if step == STARTUP_STEPS:  # one wait per epoch, so the steady rate counts finished GPU work
            synchronize(device)
            steady_start, steady_images = time.perf_counter(), images_seen
        step += 1
        asked = time.perf_counter()
        try:
            images, y, grades = next(iterator)
        except StopIteration:
            break
        waited += time.perf_counter() - asked
        x = t.transforms.train(images)
        if t.channels_last and device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, t.precision):
            loss = t.loss_fn(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None and scaler.is_enabled():
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        if t.scheduler is not None:
            t.scheduler.step()
        total_loss += loss.detach() * len(grades)
        images_seen += len(grades)
        grade_counts += np.bincount(grades, minlength=5)[:5]
        if progress and step % PROGRESS_EVERY == 0:  # the shown loss is a host read: not every step
            bar.set_description(f"{description} loss {loss.item():.3f}")
    if progress:
        bar.close()
    synchronize(device)
    end = time.perf_counter()
    rate = images_seen / max(end - start, 1e-9)
    steady = (images_seen - steady_images) / max(end - steady_start, 1e-9) if images_seen > steady_images else rate
    return {
        "train_loss": total_loss.item() / max(images_seen, 1),
        "train_images": images_seen,
        "images_per_s": rate,
        "steady_images_per_s": steady,
        "data_wait_share": waited / max(end - start, 1e-9),
        "train_grade_counts": grade_counts.tolist(),  # what the weighted sampling delivered
    }


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (a GPU runs behind the Python that queues it)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def predict_outputs(
    model: torch.nn.Module,
    row_batches: Iterable[dict],
    transforms: GradeTransforms,
    device: torch.device,
    batch_size: int = 64,
    encoding: str = "raw",
    precision: str = "fp32",
    progress: bool = False,
) -> tuple[torch.Tensor, np.ndarray, list[str]]:
    """Model outputs (float32, on CPU), grades and ids for every row, in stream order."""
    model.eval()
    outputs, grades, ids = [], [], []
    for batch in tqdm(row_batches, desc="eval", disable=not progress, leave=False):
        images = decode_batch(batch, encoding)
        for start in range(0, len(images), batch_size):
            x = transforms.eval(to_device(images[start : start + batch_size], device))
            with autocast(device, precision):
                outputs.append(model(x).float().cpu())
        grades.append(np.asarray(batch["grade"], dtype=np.int64))
        ids.extend(str(i) for i in batch["id"])
    if not outputs:
        return torch.zeros(0, 1), np.zeros(0, dtype=np.int64), []
    return torch.cat(outputs), np.concatenate(grades), ids


# --- repeatable CPU training ------------------------------------------------------------------------
# The same seed, data and machine give the same weights and figures.
#
# What varies a CPU run otherwise, and what holds it still:
# - torch's thread count (``train.threads``): float sums split over a different number of threads
#   add in a different order; a fixed count (Ray workers have ``cpus_per_worker``) fixes the order;
# - kernels without a deterministic path (``train.deterministic``: ``torch.use_deterministic_algorithms``,
#   warning where an op has none rather than failing the run);
# - the random stream of augmentation, dropout and stochastic depth: reseeded at every epoch from
#   (seed, epoch, rank) (``epoch_seed``), so an epoch draws the same numbers whether the run got there
#   in one go or resumed from a checkpoint. Row order is already seeded (the local backend's
#   permutation, Ray Data's ``local_shuffle_seed``), and so is resampling (per row id, ``train.sampling``).
#
# Ray runs with several workers split the training data between them in the order blocks are asked
# for, which Ray Data does not fix: they are repeatable within the spread stated in benchmarks/RESULTS.md.


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """torch's seed for one epoch of one rank: independent streams for every (seed, epoch, rank)."""
    return int(np.random.SeedSequence([seed & 0xFFFFFFFF, epoch, rank]).generate_state(1)[0])


@contextlib.contextmanager
def repeatable(threads: int, deterministic: bool, device: torch.device) -> Iterator[None]:
    """Fixed thread count and deterministic kernels (CPU) while the block runs; restored after it
    (a test process runs several fits)."""
    old_threads, old_mode = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    old_warn, old_benchmark = torch.is_deterministic_algorithms_warn_only_enabled(), torch.backends.cudnn.benchmark
    if threads:
        torch.set_num_threads(threads)
    if deterministic and device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
    if not deterministic and device.type == "cuda":
        # cuDNN times its kernels for each input shape once and keeps the fastest; which one wins
        # can differ between runs, so only where repeatability was not asked for.
        torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_mode, warn_only=old_warn)
        torch.backends.cudnn.benchmark = old_benchmark
