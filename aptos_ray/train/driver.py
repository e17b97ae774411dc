"""The training job's driver: resolve the run, make sure data exists, run Ray or local, then write the
run's metrics.jsonl, plots and summary.json from its record (``train.checkpoint``)."""

from __future__ import annotations

import dataclasses
import time
from datetime import datetime

import pyarrow.fs as pafs

from aptos_ray import storage
from aptos_ray.config import Config
from aptos_ray.data.embedded import check_validation_split, ensure_dataset
from aptos_ray.errors import ExistingFileError, MissingFileError
from aptos_ray.train.checkpoint import (
    RunRecord,
    checkpoint_folders,
    record_from_folders,
    record_from_result,
    summary_text,
    write_run_files,
)
from aptos_ray.train.local import LocalBackend
from aptos_ray.train.loop import DatasetInfo, fit

RAY_RECORD = "checkpoint_manager_snapshot.json"  # Ray Train's record of a run's kept checkpoints


def has_checkpoints(run_dir: str) -> bool:
    """True once a run has kept a checkpoint (Ray's record, or a local checkpoint folder)."""
    if storage.exists(storage.join(run_dir, RAY_RECORD)):
        return True
    return not storage.is_uri(run_dir) and bool(checkpoint_folders(run_dir))


def run_name(cfg: Config) -> str:
    """The run's name: given, the latest run under train.output for --resume, or a timestamp."""
    if cfg.train.name:
        return cfg.train.name
    if cfg.train.resume:
        # Listed through pyarrow: train.output may be a URI (s3://, gs://, file://).
        fs, root = storage.filesystem(cfg.train.output)
        runs = [d.path for d in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
                if d.type == pafs.FileType.Directory]
        configs = [f for f in fs.get_file_info([f"{r}/config.yaml" for r in runs]) if f.type == pafs.FileType.File]
        if not configs:
            raise MissingFileError(f"--resume: no run found under {cfg.train.output}; pass --train.name")
        return max(configs, key=lambda f: f.mtime).path.rstrip("/").split("/")[-2]
    return datetime.now().strftime("run-%Y%m%d-%H%M%S")


def check_run_dir(cfg: Config, run_dir: str) -> None:
    started = has_checkpoints(run_dir)
    if cfg.train.resume and not started:
        raise MissingFileError(f"--resume: {run_dir} has no finished epoch to resume from")
    if started and not cfg.train.resume:
        raise ExistingFileError(f"{run_dir} already holds a run: pass --resume to continue it or pick another --train.name")


def train(cfg: Config) -> dict:
    """Run the training job described by ``cfg``; returns the run summary."""
    cfg.train.name = run_name(cfg)
    # Ray workers run in their own directories: every local path they see must be absolute.
    cfg.train.output = storage.absolute(cfg.train.output)
    run_dir = storage.join(cfg.train.output, cfg.train.name)
    check_run_dir(cfg, run_dir)
    manifest = ensure_dataset(cfg)
    if not cfg.data.folds:  # with folds, validation is a fold of the pooled rows
        check_validation_split(cfg, manifest)
    # Checkpoints carry the preprocessing the data really had, so predict can repeat it on raw images.
    cfg.prepare = dataclasses.replace(cfg.prepare, **{k: v for k, v in manifest.get("config", {}).items()
                                                      if hasattr(cfg.prepare, k)})
    info = DatasetInfo.for_data(cfg.data, manifest)
    cfg.data.dataset = storage.absolute(cfg.data.dataset)
    print(cfg.summary())
    print(f"Run directory: {run_dir}")
    cfg.save(storage.join(run_dir, "config.yaml"))
    started = time.perf_counter()
    summary = write_run_files(run(cfg, info, run_dir), time.perf_counter() - started)
    print(summary_text(summary))
    return summary


def run(cfg: Config, info: DatasetInfo, run_dir: str) -> RunRecord:
    """Train in this process (--local) or with Ray Train; returns the run's record."""
    if cfg.train.local:
        fit(cfg, LocalBackend(cfg, run_dir, resume=cfg.train.resume), info)
        return record_from_folders(run_dir)
    from aptos_ray.train.ray_backend import (
        run_ray,  # Ray only where it runs: --local needs none
    )

    result = run_ray(cfg, info)
    if result.error:
        raise result.error
    return record_from_result(result, run_dir)
