"""The training loop, shared by Ray Train workers and the local fallback.

``fit(cfg, backend, info)`` knows nothing of Ray: a *backend* supplies this rank's data, wraps
the model for DDP, restores and reports checkpoints. ``train.ray_backend.RayBackend`` is the Ray one,
``LocalBackend`` (below) the one-process one; every other line is the same for both.
"""

from __future__ import annotations

import math
import os
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from aptos_ray import storage
from aptos_ray.config import Config, OptimConfig
from aptos_ray.data.embedded import dataset_preprocessing
from aptos_ray.data.folds import fold_counts, training_tables
from aptos_ray.data.format import table_batches
from aptos_ray.metrics import NUM_GRADES, grading_metrics
from aptos_ray.model.factory import create_model, maybe_sync_bn, model_data_config, param_groups
from aptos_ray.model.heads import Head, get_head
from aptos_ray.model.weights import unwrap
from aptos_ray.train.augment import CAMERA, GradeTransforms
from aptos_ray.train.checkpoint import (
    Checkpoint,
    CorruptCheckpointError,
    best_key,
    checkpoint_folders,
    checkpoint_name,
    load_weights,
    read_checkpoint,
    read_history,
    save_checkpoint,
)
from aptos_ray.train.sampling import repeat_rates, resample_batches
from aptos_ray.train.step import (
    Training,
    epoch_seed,
    fixed_step_minibatches,
    grad_scaler,
    predict_outputs,
    repeatable,
    resolve_precision,
    train_one_epoch,
)
from aptos_ray.train.tracking import Tracker


@dataclass
class DatasetInfo:
    """What every rank needs to know about the prepared dataset (read once by the driver)."""

    train_counts: dict[int, int]
    num_val: int
    encoding: str = "raw"
    # the manifest's prepare settings: every checkpoint carries them, so predict can make new
    # photographs look like the training images whatever becomes of the dataset
    preprocessing: dict | None = None

    @property
    def num_train(self) -> int:
        return sum(self.train_counts.values())

    @classmethod
    def from_manifest(cls, manifest: dict) -> "DatasetInfo":
        counts = manifest["counts"]
        return cls(
            train_counts={int(g): int(n) for g, n in counts.get("train", {}).items()},
            num_val=sum(int(n) for n in counts.get("val", {}).values()),
            encoding=manifest.get("encoding", "raw"),
            preprocessing=dataset_preprocessing(manifest),
        )

    @classmethod
    def for_data(cls, data, manifest: dict) -> "DatasetInfo":
        """The prepared train/val splits, or with ``data.folds`` the training folds and fold ``data.fold``."""
        if not data.folds:
            return cls.from_manifest(manifest)
        counts, num_val = fold_counts(data.dataset, data.folds, data.fold, data.fold_seed)
        return cls(train_counts=counts, num_val=num_val, encoding=manifest.get("encoding", "raw"),
                   preprocessing=dataset_preprocessing(manifest))


class Backend(Protocol):
    rank: int
    world_size: int
    device: torch.device
    progress_bar: type  # tqdm-like

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module: ...

    def train_rows(self, epoch: int) -> Iterable[dict]: ...

    def val_rows(self) -> Iterable[dict]: ...

    def restored_state(self) -> Checkpoint | None: ...

    def report(self, metrics: dict, checkpoint_dir: Path | None, epoch: int) -> None: ...


# --- building blocks -------------------------------------------------------------------------


def steps_per_epoch(cfg: Config, num_train: int, world_size: int) -> int:
    """One pass worth of samples, split over the ranks; every rank runs exactly this many."""
    steps = max(1, num_train // (cfg.train.batch_size * world_size))
    if cfg.train.max_steps_per_epoch:
        steps = min(steps, cfg.train.max_steps_per_epoch)
    return steps


def build_optimizer(optim: OptimConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    groups = param_groups(model, optim.lr, optim.backbone_lr_mult, optim.weight_decay)
    if optim.optimizer == "adam":
        return torch.optim.Adam(groups, lr=optim.lr)
    if optim.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=optim.lr)
    raise ValueError(f"optim.optimizer must be adam or adamw, got '{optim.optimizer}'")


def lr_factor(optim: OptimConfig, step: int, steps: int, epochs: int) -> float:
    """Learning-rate multiplier after ``step`` optimizer steps (stepped per batch)."""
    epoch = step / steps
    if optim.scheduler == "step":  # the seed's StepLR, stepped per epoch
        return optim.gamma ** (int(epoch) // max(optim.step_size, 1))
    if optim.scheduler == "cosine":
        warmup = optim.warmup_epochs
        if epoch < warmup:
            return (epoch + 1 / steps) / warmup
        progress = (epoch - warmup) / max(epochs - warmup, 1e-9)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    if optim.scheduler == "none":
        return 1.0
    raise ValueError(f"optim.scheduler must be cosine, step or none, got '{optim.scheduler}'")


def build_scheduler(optim: OptimConfig, optimizer, steps: int, epochs: int):
    """Per-step LambdaLR. Backbone groups get 0 during the head-only warm-up epochs."""

    def for_group(group: dict):
        is_backbone = group.get("name", "").startswith("backbone")

        def factor(step: int) -> float:
            if is_backbone and step < optim.head_only_epochs * steps:
                return 0.0
            return lr_factor(optim, step, steps, epochs)

        return factor

    return torch.optim.lr_scheduler.LambdaLR(optimizer, [for_group(g) for g in optimizer.param_groups])


def class_weights(counts: dict[int, int], num_classes: int = NUM_GRADES) -> torch.Tensor:
    """The seed's weights: total / (classes * count), 0 for a grade that is absent."""
    total = sum(counts.values())
    return torch.tensor(
        [total / (num_classes * counts[g]) if counts.get(g) else 0.0 for g in range(num_classes)],
        dtype=torch.float32,
    )


def gather(obj):
    """All ranks' objects as a list (just ``[obj]`` without torch.distributed)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def peak_memory_mb() -> float:
    """This process's peak resident CPU memory (GPU memory is reported by torch.cuda separately)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def peak_gpu_memory_mb(device: torch.device) -> float:
    """Peak memory torch allocated on this worker's GPU so far (0 on the CPU)."""
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else 0.0


# --- the loop ------------------------------------------------------------------------------------


def validate(model, backend: Backend, transforms, head: Head, loss_fn, cfg: Config,
             info: DatasetInfo, precision: str = "fp32") -> tuple[dict, list | None]:
    """Validation metrics over every rank's part of the val split (never resampled or augmented)."""
    # The unwrapped model: a DDP forward broadcasts buffers, which would hang ranks whose
    # validation parts differ in length.
    outputs, grades, _ = predict_outputs(
        unwrap(model), backend.val_rows(), transforms, backend.device, cfg.train.eval_batch_size,
        info.encoding, precision=precision,
    )
    parts = gather((outputs, grades))
    outputs = torch.cat([p[0] for p in parts])
    grades = np.concatenate([p[1] for p in parts])
    if len(grades) == 0:
        raise RuntimeError("the validation split is empty: prepare with prepare.val_fraction > 0")
    loss = float(loss_fn(outputs, torch.from_numpy(grades)))
    cut_points = head.fit_cut_points(outputs, grades)
    predicted = head.grades(outputs, cut_points).numpy()
    return {"val_loss": loss, **grading_metrics(grades, predicted, prefix="val_"), "val_images": len(grades)}, cut_points


def fit(cfg: Config, backend: Backend, info: DatasetInfo) -> dict:
    """Train ``cfg.train.epochs`` epochs; returns the last epoch's metrics."""
    with repeatable(cfg.train.threads, cfg.train.deterministic, backend.device):
        return _fit(cfg, backend, info)


@dataclass
class Run:
    """One rank's run, built once: what every epoch trains with, and where the record goes."""

    training: Training
    head: Head
    steps: int
    rates: dict[int, float]  # per-grade repeat rates of the weighted resampling
    start_epoch: int
    history: list[dict]
    tracker: Tracker | None  # rank 0's TensorBoard / MLflow history


def _fit(cfg: Config, backend: Backend, info: DatasetInfo) -> dict:
    run = build_run(cfg, backend, info)
    metrics: dict = {}
    for epoch in range(run.start_epoch, cfg.train.epochs):
        metrics, cut_points = run_epoch(cfg, backend, info, run, epoch)
        save_epoch(cfg, backend, info, run, metrics, cut_points)
    if run.tracker is not None:
        run.tracker.close()
    return metrics


def build_run(cfg: Config, backend: Backend, info: DatasetInfo) -> Run:
    """The model (restored when the backend has a checkpoint), transforms, loss, optimizer and schedule."""
    rank, device = backend.rank, backend.device
    torch.manual_seed(cfg.train.seed + rank)
    if device.type == "cuda":  # peak_gpu_memory_mb is this run's, also when a process runs several
        torch.cuda.reset_peak_memory_stats(device)
    restored = backend.restored_state()
    # A restored run takes its weights from the checkpoint: no hub or package read.
    model = create_model(cfg.model, load_pretrained=restored is None)
    model = maybe_sync_bn(model, cfg.model.batch_norm == "sync" and backend.world_size > 1)
    if restored is not None:
        load_weights(model, restored, cfg)
    data_cfg = model_data_config(model)
    size = cfg.data.image_size or data_cfg["input_size"][-1]
    transforms = GradeTransforms(size, data_cfg["mean"], data_cfg["std"], augment=cfg.data.augment,
                                 **(CAMERA if cfg.data.colour == "camera" else {}))
    head = get_head(cfg.model.head)
    steps = steps_per_epoch(cfg, info.num_train, backend.world_size)
    precision = resolve_precision(cfg.train.precision, device)
    channels_last = cfg.train.channels_last and device.type == "cuda"
    # The model goes to its device before the optimizer exists and its state is restored: torch
    # moves optimizer state to each parameter's device when the state is loaded, and never again.
    if channels_last:  # before DDP wraps it; moving to the GPU keeps the memory format
        model = model.to(memory_format=torch.channels_last)
    model = backend.prepare_model(model)
    optimizer = build_optimizer(cfg.optim, unwrap(model))
    scheduler = build_scheduler(cfg.optim, optimizer, steps, cfg.train.epochs)
    scaler = grad_scaler(precision)
    start_epoch, history = 0, []
    if restored is not None:
        optimizer.load_state_dict(restored.optimizer)
        scheduler.load_state_dict(restored.scheduler)
        if scaler.is_enabled() and restored.scaler:  # empty when saved by a bf16, fp32 or CPU run
            scaler.load_state_dict(restored.scaler)
        start_epoch = restored.epoch + 1
        history = [h for h in restored.history if h["epoch"] < start_epoch]
    if rank == 0:
        if restored is not None:
            print(f"Resumed from the checkpoint of epoch {start_epoch - 1}")
        print(f"{info.num_train} training images, {steps} steps/epoch x {backend.world_size} "
              f"workers x batch {cfg.train.batch_size}, input {size}px, sampling={cfg.data.sampling}")
    weights = class_weights(info.train_counts) if cfg.optim.class_weighted_loss else None
    training = Training(model, transforms, head.loss(weights, cfg.optim.label_smoothing), optimizer, scheduler,
                        device, scaler, precision, channels_last)
    # A failed run leaves its MLflow run open: --resume continues it.
    tracker = Tracker(cfg, run_dir(cfg), history) if rank == 0 else None
    return Run(training, head, steps, repeat_rates(info.train_counts, cfg.data.sampling), start_epoch, history,
               tracker)


def run_epoch(cfg: Config, backend: Backend, info: DatasetInfo, run: Run, epoch: int) -> tuple[dict, list | None]:
    """Train one epoch on this rank's resampled rows, validate over every rank: (metrics, cut-points)."""
    started, rank, t = time.perf_counter(), backend.rank, run.training
    torch.manual_seed(epoch_seed(cfg.train.seed, epoch, rank))  # augmentation, dropout: see train.step.repeatable
    rows = resample_batches(backend.train_rows(epoch), run.rates, cfg.train.seed, epoch)
    batches = fixed_step_minibatches(
        rows, cfg.train.batch_size, run.steps, seed=cfg.train.seed * 100003 + epoch * 101 + rank,
        encoding=info.encoding,
    )
    train_stats = train_one_epoch(
        t, batches, run.steps, progress=cfg.train.progress and rank == 0, description=f"epoch {epoch}",
        progress_bar=backend.progress_bar, prefetch=cfg.data.prefetch_batches,
    )
    totals = gather((train_stats["images_per_s"], train_stats["train_grade_counts"], peak_memory_mb(),
                     train_stats["data_wait_share"], peak_gpu_memory_mb(t.device),
                     train_stats["steady_images_per_s"]))
    train_stats["images_per_s"] = sum(x[0] for x in totals)
    train_stats["steady_images_per_s"] = sum(x[5] for x in totals)
    train_stats["train_grade_counts"] = np.sum([x[1] for x in totals], axis=0).tolist()
    train_stats["peak_memory_mb"] = [round(x[2]) for x in totals]  # per worker
    train_stats["data_wait_share"] = max(x[3] for x in totals)  # the slowest-fed worker's
    if t.device.type == "cuda":
        train_stats["peak_gpu_memory_mb"] = [round(x[4]) for x in totals]  # per worker
    val_metrics, cut_points = validate(t.model, backend, t.transforms, run.head, t.loss_fn, cfg, info, t.precision)
    metrics = {"epoch": epoch, **train_stats, **val_metrics, "lr": t.optimizer.param_groups[-1]["lr"],
               "epoch_seconds": time.perf_counter() - started}
    run.history.append(metrics)
    return metrics, cut_points


def save_epoch(cfg: Config, backend: Backend, info: DatasetInfo, run: Run, metrics: dict,
               cut_points: list | None) -> None:
    """Rank 0 writes the epoch's checkpoint and history; every rank reports to the backend."""
    t = run.training
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint_dir = None
        if backend.rank == 0:
            state = {
                "model": unwrap(t.model).state_dict(), "config": cfg.to_dict(), "cut_points": cut_points,
                "epoch": metrics["epoch"], "metrics": metrics, "optimizer": t.optimizer.state_dict(),
                "scheduler": t.scheduler.state_dict(), "scaler": t.scaler.state_dict(),
                "preprocessing": info.preprocessing,
            }
            checkpoint_dir = save_checkpoint(Path(tmp) / "checkpoint", state, cfg, run.history)
            print(epoch_line(metrics), flush=True)
            run.tracker.log_epoch(metrics, checkpoint_dir)
        backend.report(metrics, checkpoint_dir, metrics["epoch"])


def run_dir(cfg: Config) -> str:
    return storage.join(storage.absolute(cfg.train.output), cfg.train.name)


def epoch_line(m: dict) -> str:
    recalls = " ".join(f"{m[f'val_recall_{g}']:.2f}" for g in range(5))
    return (f"epoch {m['epoch']:3d} | train loss {m['train_loss']:.4f} | val loss {m['val_loss']:.4f} "
            f"acc {m['val_acc']:.3f} kappa {m['val_kappa']:.3f} QWK {m['val_qwk']:.4f} | "
            f"recall/grade {recalls} | {m['images_per_s']:.1f} img/s")


# --- the local backend: this process, one GPU or the CPU, no Ray ------------------------------------

class LocalBackend:
    """Data from Parquet via pyarrow, checkpoints kept in the run directory like Ray keeps them."""

    rank = 0
    world_size = 1
    progress_bar = tqdm

    def __init__(self, cfg: Config, run_dir: str, resume: bool):
        if storage.is_uri(run_dir):
            raise ValueError(f"--local writes to local disk; train.output={cfg.train.output} is a URI: run with Ray")
        self.cfg = cfg
        self.run_dir = run_dir
        self.resume = resume
        self.device = torch.device("cuda" if cfg.scaling.use_gpu and torch.cuda.is_available() else "cpu")
        # Scores of the kept checkpoints, for pruning (a resumed run starts with those it kept).
        self.scores = {h["epoch"]: h for h in self._kept_history()}
        self.train_table, self.val_table = training_tables(cfg.data)  # the prepared splits, or a fold's

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(self.device)

    def train_rows(self, epoch: int) -> Iterator[dict]:
        order = np.random.default_rng([self.cfg.train.seed, epoch]).permutation(self.train_table.num_rows)
        return table_batches(self.train_table, self.cfg.data.read_batch_size, order)

    def val_rows(self) -> Iterator[dict]:
        return table_batches(self.val_table, self.cfg.data.read_batch_size)

    def restored_state(self) -> Checkpoint | None:
        """The latest checkpoint that loads; one that does not is reported and the one before tried."""
        if not self.resume:
            return None
        for epoch, folder in sorted(checkpoint_folders(self.run_dir).items(), reverse=True):
            try:
                return read_checkpoint(folder, resume=True)
            except CorruptCheckpointError as e:
                print(f"warning: skipping the checkpoint of epoch {epoch}: {e}", file=sys.stderr)
        return None

    def report(self, metrics: dict, checkpoint_dir: Path | None, epoch: int) -> None:
        """Keep the checkpoint as Ray Train would: copied aside, renamed into place, then pruned."""
        if checkpoint_dir is None:
            return
        target = Path(self.run_dir) / checkpoint_name(epoch)
        aside = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        storage.remove_dead_leftovers(target)  # the aside folder of a killed run that wrote this epoch
        shutil.rmtree(aside, ignore_errors=True)
        try:
            with storage.named(str(target)):
                shutil.copytree(checkpoint_dir, aside)
        except Exception:  # a full disk leaves no half copy behind, not even a hidden one (a kill's the next run removes)
            shutil.rmtree(aside, ignore_errors=True)
            raise
        shutil.rmtree(target, ignore_errors=True)
        aside.rename(target)  # a kill before this line leaves only a hidden folder, never a half checkpoint
        self.scores[epoch] = metrics
        self._prune(epoch)

    def _prune(self, latest: int) -> None:
        """Keep the best ``keep_checkpoints`` by ``best_key`` and the latest, the rule Ray Train applies.

        Written here because Ray Train's checkpoint manager only runs inside a Ray Train run.
        """
        found = checkpoint_folders(self.run_dir)
        ranked = sorted((e for e in found if e in self.scores), key=lambda e: best_key(self.scores[e]), reverse=True)
        keep = set(ranked[: max(self.cfg.train.keep_checkpoints, 1)]) | {latest}
        for epoch, path in found.items():
            if epoch not in keep:
                shutil.rmtree(path, ignore_errors=True)

    def _kept_history(self) -> list[dict]:
        found = checkpoint_folders(self.run_dir) if self.resume else {}
        if not found:
            return []
        try:
            return [h for h in read_history(found[max(found)]) if h["epoch"] in found]
        except (OSError, ValueError):
            return []
