"""Everything Ray Train: the TorchTrainer, its datasets, and the worker-side backend for ``loop.fit``.

Choices for small machines (2 CPU cores), measured, see README "Ray on small machines":
- the datasets are materialised in the object store before ``fit()``: a lazy, streaming read
  fed to 2 workers x 1 CPU stalled for minutes ("backpressured: ResourceBudget"), because the
  workers held every CPU the read tasks needed;
- only the train split is split across workers; every worker sees the whole (small, never
  resampled) val split and evaluates every ``world_size``-th row of it, so no validation
  row is dropped by an equal split and the gathered predictions cover the split exactly once.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import ray
import ray.train
import ray.train.torch
import torch
from ray.experimental.tqdm_ray import tqdm as tqdm_ray
from ray.train import (
    CheckpointConfig,
    DataConfig,
    FailureConfig,
    RunConfig,
    ScalingConfig,
)
from ray.train.torch import TorchConfig, TorchTrainer

from aptos_ray import storage
from aptos_ray.config import Config, config_from_dict
from aptos_ray.data.format import TRAIN_COLUMNS
from aptos_ray.ray_setup import init_ray
from aptos_ray.train.checkpoint import checkpoint_name, load_checkpoint_state
from aptos_ray.train.loop import DatasetInfo, fit


def load_datasets(cfg: Config) -> dict[str, ray.data.Dataset]:
    # Ray Data logs every operator's progress at INFO when stdout is no terminal (ray job logs,
    # CI): a few hundred lines per run that bury the epoch lines people read.
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    datasets = {}
    for split in ("train", "val"):
        path = storage.join(storage.absolute(cfg.data.dataset), split)
        ds = ray.data.read_parquet(path, columns=TRAIN_COLUMNS)
        datasets[split] = ds.materialize() if cfg.data.materialize else ds
    return datasets


class RayBackend:
    """``loop.Backend`` inside a Ray Train worker."""

    progress_bar = tqdm_ray  # drawn by the driver, not interleaved into worker logs

    def __init__(self, cfg: Config):
        context = ray.train.get_context()
        self.cfg = cfg
        self.rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        self.device = ray.train.torch.get_device()
        self.train_shard = ray.train.get_dataset_shard("train")
        self.val_data = ray.train.get_dataset_shard("val")

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return ray.train.torch.prepare_model(model)

    def train_rows(self, epoch: int) -> Iterator[dict]:
        return self.train_shard.iter_batches(
            batch_size=self.cfg.data.read_batch_size,
            batch_format="numpy",
            local_shuffle_buffer_size=4 * self.cfg.data.read_batch_size,
            local_shuffle_seed=self.cfg.train.seed * 1000 + epoch * 10 + self.rank,
        )

    def val_rows(self) -> Iterator[dict]:
        batches = self.val_data.iter_batches(batch_size=self.cfg.data.read_batch_size, batch_format="numpy")
        for batch in batches:
            yield {k: v[self.rank :: self.world_size] for k, v in batch.items()}

    def restored_state(self) -> dict | None:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        # as_directory() removes a downloaded copy when the block ends: the state is in memory by then.
        with checkpoint.as_directory() as directory:
            return load_checkpoint_state(directory)

    def report(self, metrics: dict, checkpoint_dir: Path | None, epoch: int) -> None:
        scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        ray.train.report(scalars, checkpoint=checkpoint, checkpoint_dir_name=checkpoint_name(epoch))


def train_worker(loop_config: dict) -> None:
    """The function every Ray Train worker runs."""
    cfg = config_from_dict(loop_config["config"])
    fit(cfg, RayBackend(cfg), DatasetInfo(**loop_config["info"]))


def ddp_backend(scaling) -> str:
    """torch.distributed's backend: NCCL for GPU workers that each own a GPU; gloo on CPUs and where
    workers share a GPU (NCCL refuses two ranks on one device; gloo all-reduces CUDA tensors too)."""
    if scaling.ddp_backend not in ("auto", "nccl", "gloo"):
        raise ValueError(f"scaling.ddp_backend must be auto, nccl or gloo, got '{scaling.ddp_backend}'")
    if scaling.ddp_backend != "auto":
        return scaling.ddp_backend
    return "nccl" if scaling.use_gpu and scaling.gpus_per_worker >= 1 else "gloo"


def worker_resources(scaling) -> dict:
    if scaling.use_gpu and not scaling.gpus_per_worker > 0:
        raise ValueError(f"scaling.gpus_per_worker must be > 0 with use_gpu, got {scaling.gpus_per_worker}")
    return {"CPU": scaling.cpus_per_worker, **({"GPU": scaling.gpus_per_worker} if scaling.use_gpu else {})}


def build_trainer(cfg: Config, info: DatasetInfo, datasets: dict, callbacks: list | None = None) -> TorchTrainer:
    """The run lands in ``train.output/train.name``; ``callbacks`` go to ``RunConfig`` (e.g. Tune's)."""
    resources = worker_resources(cfg.scaling)
    return TorchTrainer(
        train_worker,
        train_loop_config={"config": cfg.to_dict(), "info": info.__dict__},
        torch_config=TorchConfig(backend=ddp_backend(cfg.scaling)),
        scaling_config=ScalingConfig(
            num_workers=cfg.scaling.num_workers,
            use_gpu=cfg.scaling.use_gpu,
            resources_per_worker=resources,
        ),
        run_config=RunConfig(
            name=cfg.train.name,
            storage_path=storage.absolute(cfg.train.output),
            checkpoint_config=CheckpointConfig(
                num_to_keep=max(cfg.train.keep_checkpoints, 1),
                checkpoint_score_attribute="val_qwk",
                checkpoint_score_order="max",
            ),
            failure_config=FailureConfig(max_failures=cfg.scaling.max_failures),
            callbacks=callbacks,
        ),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=["train"]),
    )


def run_ray(cfg: Config, info: DatasetInfo):
    """Fit with a TorchTrainer on the connected Ray cluster; returns Ray's ``Result``, the run's record."""
    init_ray(cfg.scaling)
    trainer = build_trainer(cfg, info, load_datasets(cfg))
    return trainer.fit()
