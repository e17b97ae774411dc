"""Everything Ray Train: the TorchTrainer, its datasets, and the worker-side backend for ``loop.fit``.

Choices for small machines (2 CPU cores), measured, see README "Ray on small machines":
- the datasets are materialised in the object store before ``fit()`` when they fit in half of
  it (``data.materialize=auto``): a lazy, streaming read fed to 2 workers x 1 CPU stalled for
  minutes ("backpressured: ResourceBudget"), because the workers held every CPU the read tasks
  needed; splits bigger than that (EyePACS-size) stream from Parquet rather than spill;
- only the train split is split across workers; every worker reads the whole (small, never
  resampled) val split and evaluates the rows whose id hashes to its rank (``rows_of_rank``), so
  no validation row is dropped by an equal split and, in whatever order each worker reads them,
  the gathered predictions cover the split exactly once.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
from ray.experimental.tqdm_ray import tqdm as tqdm_ray
from ray.train import (
    CheckpointConfig,
    ControllerError,
    DataConfig,
    FailureConfig,
    LoggingConfig,
    RunConfig,
    ScalingConfig,
    UserCallback,
    WorkerGroupError,
)
from ray.train.torch import TorchConfig, TorchTrainer

from aptos_ray import storage
from aptos_ray.config import Config, config_from_dict
from aptos_ray.data.folds import fold_ids, keep_ids
from aptos_ray.data.format import SPLITS, TRAIN_COLUMNS, split_bytes
from aptos_ray.errors import ConfigError, CorruptCheckpointError, UserError, storage_failure
from aptos_ray.ray_internals import NodeType, report_logger_name, worker_error_cause
from aptos_ray.ray_setup import (
    check_assigned_gpus_usable,
    check_seen_by_every_node,
    cluster_node_types,
    init_ray,
    placement_problem,
    ray_train_log_level,
    worker_capacity,
)
from aptos_ray.train.checkpoint import CHECKPOINT_DIR, Checkpoint, checkpoint_name, read_checkpoint, stored_checkpoints
from aptos_ray.train.loop import DatasetInfo, fit

# Materialise only what fits in this share of the object store: blocks in flight, other jobs'
# objects and Ray's spilling threshold (80% full) need the rest.
MATERIALIZE_SHARE = 0.5


@contextlib.contextmanager
def rows_in_order(deterministic: bool) -> Iterator[None]:
    """Ray Data keeps the rows' order in the datasets built inside the block (when ``deterministic``):
    otherwise a filter or a read over several files emits its blocks in the order they finish, and a
    seeded run would see its rows in another order each time (train.step.repeatable)."""
    ctx = ray.data.DataContext.get_current()
    old = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = old or deterministic
    try:
        yield
    finally:
        ctx.execution_options.preserve_order = old


def load_datasets(cfg: Config) -> dict[str, ray.data.Dataset]:
    # Ray Data's progress lines: ray_setup.quiet_ray_data (unless --verbose)
    if cfg.data.folds:
        return load_fold_datasets(cfg)
    dataset, splits = storage.absolute(cfg.data.dataset), ("train", "val")
    materialize = should_materialize(cfg, dataset, splits)
    datasets = {}
    with rows_in_order(cfg.train.deterministic):
        for split in splits:
            ds = ray.data.read_parquet(**storage.ray_data_source(storage.join(dataset, split)), columns=TRAIN_COLUMNS)
            datasets[split] = ds.materialize() if materialize else ds
    return datasets


def should_materialize(cfg: Config, dataset: str, splits: tuple[str, ...]) -> bool:
    """``data.materialize`` decided (and said why) for the rows of ``splits``."""
    size = sum(split_bytes(dataset, split) for split in splits) if cfg.data.materialize == "auto" else 0
    materialize, why = materialize_decision(cfg.data.materialize, size,
                                            ray.cluster_resources().get("object_store_memory", 0))
    print(f"data: {why}")
    return materialize


def materialize_decision(setting: bool | str, size: int, store: float) -> tuple[bool, str]:
    """(materialise?, why) for ``data.materialize``: true/false as given; auto when the splits'
    ``size`` (uncompressed bytes) fits in ``MATERIALIZE_SHARE`` of the object store, else stream."""
    if setting != "auto":
        return bool(setting), f"data.materialize={str(setting).lower()}"
    budget = MATERIALIZE_SHARE * store
    fits = size <= budget
    return fits, (f"{'materialised in' if fits else 'streamed from Parquet: too big for'} the object store "
                  f"({size / 2**30:.2f} GiB of splits, {budget / 2**30:.2f} GiB = {MATERIALIZE_SHARE:.0%} of "
                  f"{store / 2**30:.2f} GiB; data.materialize=auto)")


def load_fold_datasets(cfg: Config, pool: ray.data.Dataset | None = None) -> dict[str, ray.data.Dataset]:
    """Fold ``data.fold``'s train and val rows (``data.folds``), filtered from every split's rows,
    materialised as ``data.materialize`` says; or filtered lazily from ``pool`` (those rows read,
    and materialised or not, once for all folds of a cross-validation: ``load_cv_datasets``)."""
    root = storage.absolute(cfg.data.dataset)
    train_ids, val_ids = fold_ids(root, cfg.data.folds, cfg.data.fold, cfg.data.fold_seed)
    materialize = pool is None and should_materialize(cfg, root, SPLITS)
    datasets = {}
    with rows_in_order(cfg.train.deterministic):
        if pool is None:
            pool = read_pool(root)
        for part, ids in (("train", train_ids), ("val", val_ids)):
            ds = pool.map_batches(keep_ids, batch_format="numpy", fn_kwargs={"ids": frozenset(ids)})
            datasets[part] = ds.materialize() if materialize else ds
    return datasets


def load_cv_datasets(cfg: Config, fold_configs: dict[int, Config]) -> dict[int, dict[str, ray.data.Dataset]]:
    """Every fold's datasets for a cross-validation, filtered from one read of every split. That
    read is materialised when ``data.materialize`` says so, and the folds' filters are not: the
    object store holds the rows once, not once more per fold."""
    root = storage.absolute(cfg.data.dataset)
    with rows_in_order(cfg.train.deterministic):  # every fold's rows in one fixed order (train.step.repeatable)
        pool = read_pool(root)
        if should_materialize(cfg, root, SPLITS):
            pool = pool.materialize()
    return {k: load_fold_datasets(c, pool) for k, c in fold_configs.items()}


def read_pool(dataset: str) -> ray.data.Dataset:
    """Every split's rows (the training columns) of a prepared dataset, for its folds."""
    paths = [storage.join(dataset, s) for s in SPLITS if storage.exists(storage.join(dataset, s))]
    if storage.is_local(dataset):
        return ray.data.read_parquet(paths, columns=TRAIN_COLUMNS)
    fs, _ = storage.filesystem(dataset)  # one bucket: one filesystem for every split's prefix
    return ray.data.read_parquet([storage.filesystem(p)[1] for p in paths], filesystem=fs, columns=TRAIN_COLUMNS)


def checkpoint_at(path: str) -> ray.train.Checkpoint:
    """A checkpoint folder (local path or URI) read through this project's filesystem for it."""
    fs, inner = storage.filesystem(path)
    return ray.train.Checkpoint(inner, filesystem=fs)


class RayBackend:
    """``loop.Backend`` inside a Ray Train worker."""

    progress_bar = tqdm_ray  # drawn by the driver, not interleaved into worker logs

    def __init__(self, cfg: Config):
        check_assigned_gpus_usable("Ray Train worker")
        context = ray.train.get_context()
        self.cfg = cfg
        self.rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        self.device = ray.train.torch.get_device()
        self.train_shard = ray.train.get_dataset_shard("train")
        self.val_data = ray.train.get_dataset_shard("val")
        self.run_dir = storage.join(cfg.train.output, cfg.train.name)

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
        return rows_of_rank(batches, self.rank, self.world_size)

    def restored_state(self) -> Checkpoint | None:
        """The newest checkpoint that loads: Ray Train's latest registered one, or a newer one in
        the run directory that was uploaded but never registered.

        ``ray.train.report`` returns once the checkpoint is uploaded and the report is queued in
        this worker; the controller registers it only when it next polls the workers. A worker
        killed in between (about a second) loses that report, and Ray restarts from the checkpoint
        before: the epoch reported last, or the whole run, would be trained again. The uploaded
        folder is complete by then, so it is taken instead; every rank lists the same folders.
        """
        checkpoint = ray.train.get_checkpoint()
        candidates = {epoch: checkpoint_at(path) for epoch, path in stored_checkpoints(self.run_dir).items()}
        if checkpoint is not None:
            match = CHECKPOINT_DIR.fullmatch(Path(checkpoint.path).name)
            candidates[int(match.group(1)) if match else -1] = checkpoint
        for epoch, candidate in sorted(candidates.items(), key=lambda kv: kv[0], reverse=True):
            # as_directory() removes a downloaded copy when the block ends: the state is in memory by then.
            try:
                with candidate.as_directory() as directory:
                    return read_checkpoint(directory, resume=True)
            except CorruptCheckpointError as e:
                if self.rank == 0:
                    print(f"warning: skipping the checkpoint of epoch {epoch}: {e}", file=sys.stderr)
        return None

    def report(self, metrics: dict, checkpoint_dir: Path | None, epoch: int) -> None:
        scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        target = storage.join(self.run_dir, checkpoint_name(epoch))
        try:
            ray.train.report(scalars, checkpoint=checkpoint, checkpoint_dir_name=checkpoint_name(epoch))
        except OSError as e:  # the upload: pyarrow's error names no file
            failure = storage_failure(e, target)
            if failure is None or checkpoint is None:
                raise
            remove_partial_upload(target)
            raise failure from None


def remove_partial_upload(folder: str) -> None:
    """A checkpoint folder cut short by a full disk goes: a later run must not find a truncated model.pt."""
    with contextlib.suppress(OSError):
        fs, inner = storage.filesystem(folder)
        fs.delete_dir(inner)


def rows_of_rank(batches: Iterator[dict], rank: int, world_size: int) -> Iterator[dict]:
    """This rank's rows of a split every rank reads whole: those whose id hashes to it. The
    choice depends on the id alone, not on the order the rows arrive in, which differs between
    workers when a streamed split (several files, ``train.deterministic=false``) is read without a
    fixed order: every row is then scored by exactly one rank. (Ray Train's own split,
    ``streaming_split(equal=True)``, would drop rows to make the parts equal.)"""
    for batch in batches:
        if world_size == 1:
            yield batch
            continue
        mine = np.fromiter((zlib.crc32(str(i).encode()) % world_size == rank for i in batch["id"]),
                           dtype=bool, count=len(batch["id"]))
        yield {k: v[mine] for k, v in batch.items()}


def quiet_ray_train_worker(cfg: Config) -> None:
    """No "Reporting training result N: <every metric>" per worker and epoch, unless --verbose.

    Ray Train (2.60) logs it through ``logging.getLogger(__file__)``: a logger named after the
    file path, outside ``ray.train``, so the run's ``LoggingConfig(log_level=...)`` does not filter it.
    """
    level = ray_train_log_level(cfg.scaling)
    logging.getLogger("ray.train").setLevel(level)
    name = report_logger_name()
    if name:  # another Ray version may move it: at worst the lines are back (tests/test_ray_internals.py)
        logging.getLogger(name).setLevel(level)


def train_worker(loop_config: dict) -> None:
    """The function every Ray Train worker runs."""
    cfg = config_from_dict(loop_config["config"])
    quiet_ray_train_worker(cfg)
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


def _user_error(error: BaseException | None) -> UserError | None:
    """The ``UserError`` a worker raised, inside Ray Train's wrappers (``UserExceptionWithTraceback``
    keeps it as ``_base_exc``; a ``ControllerError`` as ``controller_failure``), or the one an I/O
    error that no retry changes stands for (a full or read-only disk, an unreachable endpoint:
    ``errors.storage_failure``); else None."""
    for _ in range(4):  # the wrappers nest at most a few levels deep
        if error is None or isinstance(error, UserError):
            return error
        if isinstance(error, OSError):
            return storage_failure(error)
        if isinstance(error, WorkerGroupError):
            found = [e for e in map(_user_error, error.worker_failures.values()) if e is not None]
            return found[0] if found else None
        error = getattr(error, "controller_failure", None) or worker_error_cause(error)
    return None


class StopOnUserError(UserCallback):
    """A ``UserError`` in a worker (bad value, weights or checkpoint), like a full or read-only disk,
    fails the same way every try:
    end the run at once instead of letting ``FailureConfig`` retry it ``max_failures`` times.

    Ray Train's failure policy retries every worker error and takes no hook; an exception raised by
    a callback becomes a ``ControllerError``, which it does not retry. ``run_ray`` unwraps it again.
    """

    def after_exception(self, run_context, worker_exceptions: dict) -> None:
        for error in worker_exceptions.values():
            user_error = _user_error(error)
            if user_error is not None:
                raise user_error


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
            **storage.ray_storage(cfg.train.output),  # a URI's checkpoints go straight to the bucket
            checkpoint_config=CheckpointConfig(
                num_to_keep=max(cfg.train.keep_checkpoints, 1),
                checkpoint_score_attribute="val_qwk",
                checkpoint_score_order="max",
            ),
            failure_config=FailureConfig(max_failures=cfg.scaling.max_failures),
            logging_config=LoggingConfig(log_level=ray_train_log_level(cfg.scaling)),
            callbacks=[StopOnUserError(), *(callbacks or [])],
        ),
        datasets=datasets,
        # in order: a run with one worker then reads its rows as a repeatable sequence (train.step.repeatable)
        dataset_config=DataConfig(datasets_to_split=["train"],
                                  execution_options=execution_options(cfg.train.deterministic)),
    )


def execution_options(deterministic: bool) -> ray.data.ExecutionOptions:
    """Ray Data's options for the training datasets: rows in a fixed order when deterministic.
    Built here rather than from ``DataConfig.default_ingest_options()``, which copies the deprecated
    ``exclude_resources`` and so prints a RayDeprecationWarning in every run (Ray 2.60)."""
    current = ray.data.DataContext.get_current().execution_options
    return ray.data.ExecutionOptions(resource_limits=current.resource_limits, preserve_order=deterministic,
                                     verbose_progress=current.verbose_progress)


def check_cluster_fits(cfg: Config, node_types: list[NodeType] | None = None) -> None:
    """Refuse, before any work, a worker group the cluster can never place: Ray Train would wait
    for it ("startup timed out after 60 s") and retry for ever. On an autoscaling cluster that is
    what none of its node types can hold, up to their max count (nodes not started yet count);
    elsewhere what the nodes up now cannot hold. ``node_types``: ``cluster_node_types()``."""
    s = cfg.scaling
    per_worker = worker_resources(s)
    problem = placement_problem(per_worker, s.num_workers, cluster_node_types() if node_types is None else node_types)
    if problem:
        raise ConfigError(f"the Ray cluster cannot fit this run: {problem}. Lower --scaling.num_workers / "
                          f"--scaling.cpus_per_worker / --scaling.gpus_per_worker or add nodes")


def runs_that_fit(scaling, most: int, node_types: list[NodeType] | None = None) -> int:
    """How many runs (Tune trials, folds) of ``scaling``'s worker group the cluster holds at
    once, counting GPUs as well as CPUs: at least 1, at most ``most``."""
    types = cluster_node_types() if node_types is None else node_types
    capacity = worker_capacity(worker_resources(scaling), types)
    return max(1, min(most, int(capacity // scaling.num_workers) if math.isfinite(capacity) else most))


def run_ray(cfg: Config, info: DatasetInfo):
    """Fit with a TorchTrainer on the connected Ray cluster; returns Ray's ``Result``, the run's record."""
    init_ray(cfg.scaling)
    check_cluster_fits(cfg)
    check_seen_by_every_node({"data.dataset": storage.join(cfg.data.dataset, "manifest.json"),
                              "train.output": storage.join(cfg.train.output, cfg.train.name, "config.yaml")})
    trainer = build_trainer(cfg, info, load_datasets(cfg))
    try:
        return trainer.fit()
    except (ControllerError, WorkerGroupError) as e:
        user_error = _user_error(e)
        if user_error is not None:
            raise user_error from None
        raise
