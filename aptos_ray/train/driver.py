"""The training job's driver: resolve the run, make sure data exists, run Ray or local, then write the
run's metrics.jsonl, plots and summary.json from its record (``train.checkpoint``)."""

from __future__ import annotations

import time

from aptos_ray import storage
from aptos_ray.config import Config
from aptos_ray.data.embedded import check_validation_split, ensure_dataset, record_preprocessing
from aptos_ray.errors import ExistingFileError, MissingFileError
from aptos_ray.ownership import check_is_folder, claimed
from aptos_ray.ray_internals import CHECKPOINT_MANAGER_SNAPSHOT
from aptos_ray.train.checkpoint import (
    RunRecord,
    checkpoint_folders,
    latest_preprocessing,
    record_from_folders,
    record_from_result,
    summary_text,
    write_run_files,
)
from aptos_ray.train.loop import DatasetInfo, LocalBackend, fit
from aptos_ray.train.resume import CONFIG_FILE, check_resume, check_same_preprocessing, read_saved_config, run_name

RAY_RECORD = CHECKPOINT_MANAGER_SNAPSHOT  # Ray Train's record of a run's kept checkpoints


def has_checkpoints(run_dir: str) -> bool:
    """True once a run has kept a checkpoint (Ray's record, or a local checkpoint folder)."""
    if storage.exists(storage.join(run_dir, RAY_RECORD)):
        return True
    return not storage.is_uri(run_dir) and bool(checkpoint_folders(run_dir))


def check_run_dir(cfg: Config, run_dir: str) -> None:
    started = has_checkpoints(run_dir)
    if cfg.train.resume and not started:
        raise MissingFileError(f"--resume: {run_dir} has no finished epoch to resume from")
    if started and not cfg.train.resume:
        raise ExistingFileError(f"{run_dir} already holds a run: pass --resume to continue it or pick another --train.name")


def train(cfg: Config) -> dict:
    """Run the training job described by ``cfg``; returns the run summary."""
    manifest = ensure_dataset(cfg)
    if not cfg.data.folds:  # with folds, validation is a fold of the pooled rows
        check_validation_split(cfg, manifest)
    cfg.train.name = run_name(cfg)  # a fresh name creates its folder: only once the config and data are good
    # Ray workers run in their own directories: every local path they see must be absolute.
    cfg.train.output = storage.absolute(cfg.train.output)
    run_dir = storage.join(cfg.train.output, cfg.train.name)
    check_is_folder(run_dir)
    with claimed(run_dir, "run", "wait for it to end, or pick another --train.name"):
        return train_claimed(cfg, run_dir, manifest)


def train_claimed(cfg: Config, run_dir: str, manifest: dict) -> dict:
    """The run, once this process holds its folder (``ownership.claimed``)."""
    check_run_dir(cfg, run_dir)
    saved = read_saved_config(storage.join(run_dir, CONFIG_FILE)) if cfg.train.resume else None
    if saved is not None:
        check_resume(saved, cfg, run_dir)
        check_same_preprocessing(latest_preprocessing(run_dir), manifest, cfg.data.dataset)
    record_preprocessing(cfg, manifest)
    info = DatasetInfo.for_data(cfg.data, manifest)
    cfg.data.dataset = storage.absolute(cfg.data.dataset)
    print(cfg.summary())
    print(f"Run directory: {run_dir}")
    cfg.save(storage.join(run_dir, CONFIG_FILE))
    started = time.perf_counter()
    summary = write_run_files(run(cfg, info, run_dir), time.perf_counter() - started)
    print(summary_text(summary))
    return summary


def run(cfg: Config, info: DatasetInfo, run_dir: str) -> RunRecord:
    """Train in this process (--local) or with Ray Train; returns the run's record."""
    if cfg.train.local:
        fit(cfg, LocalBackend(cfg, run_dir, resume=cfg.train.resume), info)
        return record_from_folders(run_dir)
    from aptos_ray.train.ray_backend import run_ray  # Ray only where it runs: --local needs none

    result = run_ray(cfg, info)
    if result.error:
        raise result.error
    return record_from_result(result, run_dir)
