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
    LoggingConfig,
    RunConfig,
    ScalingConfig,
)
from ray.train.torch import TorchTrainer

from aptos_ray import storage
from aptos_ray.config import Config, config_from_dict
from aptos_ray.data.format import TRAIN_COLUMNS
from aptos_ray.ray_setup import init_ray, ray_train_log_level
from aptos_ray.train.checkpoint import checkpoint_name, load_checkpoint_state
from aptos_ray.train.loop import DatasetInfo, fit


def load_datasets(cfg: Config) -> dict[str, ray.data.Dataset]:
    # Ray Data's progress lines: ray_setup.quiet_ray_data (unless --verbose)
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


def quiet_ray_train_worker(cfg: Config) -> None:
    """No "Reporting training result N: <every metric>" per worker and epoch, unless --verbose.

    Ray Train (2.60) logs it through ``logging.getLogger(__file__)``: a logger named after the
    file path, outside ``ray.train``, so the run's ``LoggingConfig(log_level=...)`` does not filter it.
    """
    level = ray_train_log_level(cfg.scaling)
    logging.getLogger("ray.train").setLevel(level)
    try:
        from ray.train.v2._internal.execution import context as train_context

        logging.getLogger(train_context.__file__).setLevel(level)
    except ImportError:  # another Ray version: at worst the lines are back
        pass


def train_worker(loop_config: dict) -> None:
    """The function every Ray Train worker runs."""
    cfg = config_from_dict(loop_config["config"])
    quiet_ray_train_worker(cfg)
    fit(cfg, RayBackend(cfg), DatasetInfo(**loop_config["info"]))


def build_trainer(cfg: Config, info: DatasetInfo, datasets: dict, callbacks: list | None = None) -> TorchTrainer:
    """The run lands in ``train.output/train.name``; ``callbacks`` go to ``RunConfig`` (e.g. Tune's)."""
    resources = {"CPU": cfg.scaling.cpus_per_worker}
    return TorchTrainer(
        train_worker,
        train_loop_config={"config": cfg.to_dict(), "info": info.__dict__},
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
            logging_config=LoggingConfig(log_level=ray_train_log_level(cfg.scaling)),
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
