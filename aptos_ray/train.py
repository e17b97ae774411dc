"""The training job's driver: resolve the run, make sure data exists, run Ray or local, summarise."""

from __future__ import annotations

import dataclasses
import json
import time
from datetime import datetime

import pyarrow.fs as pafs

from aptos_ray import storage
from aptos_ray.config import Config
from aptos_ray.errors import ExistingFileError, MissingFileError
from aptos_ray.loop import DatasetInfo, RunFiles
from aptos_ray.models import check_batch_norm, check_sync_bn_device
from aptos_ray.records import MANIFEST, read_manifest


def uses_embedded_default(cfg: Config) -> bool:
    """True when the config trains on the synthetic dataset that it also knows how to build."""
    return cfg.prepare.input == cfg.synthetic.output and cfg.prepare.output == cfg.data.dataset


def ensure_dataset(cfg: Config) -> dict:
    """The prepared dataset's manifest; the embedded default is generated on first use."""
    manifest_path = storage.join(cfg.data.dataset, MANIFEST)
    if not storage.exists(manifest_path):
        if not uses_embedded_default(cfg):
            raise MissingFileError(
                f"{manifest_path} not found: prepare the dataset first, e.g. `python jobs/prepare.py "
                f"--prepare.input=<raw data> --prepare.output={cfg.data.dataset}`"
            )
        build_default_dataset(cfg)
    return read_manifest(cfg.data.dataset)


def build_default_dataset(cfg: Config) -> None:
    """Synthetic fundus photos -> prepared dataset (about a minute for the default 600 images)."""
    from aptos_ray.prepare import prepare
    from aptos_ray.synthetic import generate

    print(f"No dataset at {cfg.data.dataset}: generating the embedded synthetic default "
          f"({cfg.synthetic.num_images} images) and preparing it.")
    generate(cfg.synthetic)
    prepare(cfg)


def run_name(cfg: Config) -> str:
    """The run's name: given, the latest run under train.output for --resume, or a timestamp."""
    if cfg.train.name:
        return cfg.train.name
    if cfg.train.resume:
        # Listed through pyarrow: train.output may be a URI (s3://, gs://, file://).
        fs, root = storage.filesystem(cfg.train.output)
        runs = [d.path for d in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
                if d.type == pafs.FileType.Directory]
        metrics = [f for f in fs.get_file_info([f"{r}/metrics.jsonl" for r in runs]) if f.type == pafs.FileType.File]
        if not metrics:
            raise MissingFileError(f"--resume: no run found under {cfg.train.output}; pass --train.name")
        return max(metrics, key=lambda f: f.mtime).path.rstrip("/").split("/")[-2]
    return datetime.now().strftime("run-%Y%m%d-%H%M%S")


def check_run_dir(cfg: Config, run_dir: str) -> None:
    started = storage.exists(storage.join(run_dir, "metrics.jsonl"))
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
    check_batch_norm(cfg.model)  # here, not first inside the Ray workers
    if not cfg.train.local:
        check_sync_bn_device(cfg.model.batch_norm, cfg.scaling.num_workers, cfg.scaling.use_gpu)
    manifest = ensure_dataset(cfg)
    # Checkpoints carry the preprocessing the data really had, so predict can repeat it on raw images.
    cfg.prepare = dataclasses.replace(cfg.prepare, **{k: v for k, v in manifest.get("config", {}).items()
                                                      if hasattr(cfg.prepare, k)})
    info = DatasetInfo.from_manifest(manifest)
    cfg.data.dataset = storage.absolute(cfg.data.dataset)
    print(cfg.summary())
    print(f"Run directory: {run_dir}")
    started = time.perf_counter()
    if cfg.train.local:
        from aptos_ray.local import LocalBackend
        from aptos_ray.loop import fit

        fit(cfg, LocalBackend(cfg, run_dir, resume=cfg.train.resume), info)
    else:
        from aptos_ray.ray_train import run_ray

        result = run_ray(cfg, info)
        if result.error:
            raise result.error
    summary = summarise(run_dir, time.perf_counter() - started)
    print(summary_text(summary))
    return summary


def summarise(run_dir: str, seconds: float) -> dict:
    """summary.json: the best epoch by validation QWK and where its checkpoint is."""
    history = RunFiles(run_dir).history()
    if not history:
        raise RuntimeError(f"{run_dir}: no epoch finished")
    best = max(history, key=lambda h: h["val_qwk"])
    last = history[-1]
    checkpoint = lambda h: storage.join(run_dir, f"checkpoint_epoch_{h['epoch']:04d}")  # noqa: E731
    summary = {
        "run_dir": run_dir,
        "epochs": len(history),
        "best_epoch": best["epoch"],
        "best_val_qwk": best["val_qwk"],
        "best_val_acc": best["val_acc"],
        "best_val_kappa": best["val_kappa"],
        "best_checkpoint": checkpoint(best),
        "last_checkpoint": checkpoint(last),
        "last_val_qwk": last["val_qwk"],
        "wall_seconds": round(seconds, 1),
    }
    storage.write_text(storage.join(run_dir, "summary.json"), json.dumps(summary, indent=2))
    return summary


def summary_text(s: dict) -> str:
    return (
        f"\nDone: {s['epochs']} epochs in {s['wall_seconds']:.0f}s\n"
        f"  best validation QWK {s['best_val_qwk']:.4f} (acc {s['best_val_acc']:.3f}, "
        f"kappa {s['best_val_kappa']:.3f}) at epoch {s['best_epoch']}\n"
        f"  best checkpoint: {s['best_checkpoint']}\n"
        f"  plots: {storage.join(s['run_dir'], 'plots')}\n"
    )
