"""A training run's history for people to browse: TensorBoard events and, on request, an MLflow run.

Rank 0 of ``loop.fit`` opens one ``Tracker`` per run (``train.tracking``):

* ``tensorboard`` (the default): event files in ``<run dir>/tensorboard/``, one scalar per metric
  and epoch (``tensorboard --logdir runs`` compares runs; needs ``pip install tensorboard`` to view).
  Written with tensorboardX, which Ray Tune already depends on.
* ``mlflow``: the same events, plus an MLflow run with every config key as a parameter, the
  per-epoch metrics, and the best checkpoint (``checkpoint.best_key``, the run's one rule for
  "best") as the artifact ``best_checkpoint/``. The store is ``train.tracking_uri``, or a local file store in
  ``<run dir>/mlruns`` (``mlflow ui --backend-store-uri <run dir>/mlruns``, with the full ``mlflow``
  package). A resumed run continues the same MLflow run.
* ``none``: nothing.

Ray Train V2 keeps no free-form metrics any more: these, ``metrics.jsonl`` and ``plots/`` are the
run's history. The tracker owns ``tensorboard/``, ``mlruns/`` and ``mlflow_run_id.txt`` of the run
directory; the driver writes the rest after fit.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from aptos_ray import storage
from aptos_ray.config import Config
from aptos_ray.train.checkpoint import best_key, best_of

MLFLOW_EXPERIMENT = "aptos-ray"
MLFLOW_RUN_ID_FILE = "mlflow_run_id.txt"
TENSORBOARD_DIR = "tensorboard"


def scalar_metrics(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("epoch", "rank")}


def config_params(cfg: Config) -> dict[str, str]:
    """Every config key as an MLflow parameter (dicts and lists as JSON)."""
    return {f"{section}.{key}": json.dumps(value) if isinstance(value, (dict, list)) else str(value)
            for section, values in cfg.to_dict().items() for key, value in values.items()}


def file_store_uri(folder: str) -> str:
    """A local MLflow file store. MLflow 3 keeps it in maintenance mode and refuses it unless asked."""
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return Path(folder).absolute().as_uri()


class Tracker:
    def __init__(self, cfg: Config, run_dir: str, history: list[dict] | None = None):
        """``history``: the epochs a resumed run already has (their best stays the best until beaten)."""
        history = history or []
        start_epoch = int(history[-1]["epoch"]) + 1 if history else 0
        self.run_dir = run_dir
        self.best = best_of(history) if history else None
        self.writer = None
        self.mlflow = None
        self._tb_local: str | None = None  # where events are written before a copy to a URI run dir
        if cfg.train.tracking == "none":
            return
        self._open_tensorboard(start_epoch)
        if cfg.train.tracking == "mlflow":
            self._open_mlflow(cfg)

    # --- TensorBoard ---

    def _open_tensorboard(self, start_epoch: int) -> None:
        from tensorboardX import SummaryWriter

        if storage.is_uri(self.run_dir):
            self._tb_local = tempfile.mkdtemp(prefix="aptos-tb-")
            logdir = self._tb_local
        else:
            logdir = str(Path(self.run_dir) / TENSORBOARD_DIR)
        # purge_step: on resume, TensorBoard hides the epochs that are being trained again
        self.writer = SummaryWriter(logdir, purge_step=start_epoch or None)

    def _sync_tensorboard(self) -> None:
        if self._tb_local is None:
            return
        for path in Path(self._tb_local).iterdir():
            storage.write_bytes(storage.join(self.run_dir, TENSORBOARD_DIR, path.name), path.read_bytes())

    # --- MLflow ---

    def _open_mlflow(self, cfg: Config) -> None:
        import mlflow

        if not cfg.scaling.verbose:
            logging.getLogger("mlflow").setLevel(logging.WARNING)  # "Creating a new experiment" ...
        uri = cfg.train.tracking_uri or file_store_uri(str(Path(self.run_dir) / "mlruns"))
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment(MLFLOW_EXPERIMENT)
        id_file = storage.join(self.run_dir, MLFLOW_RUN_ID_FILE)
        run_id = storage.read_text(id_file).strip() if storage.exists(id_file) else None
        run = mlflow.start_run(run_id=run_id, run_name=None if run_id else cfg.train.name)
        if run_id is None:
            mlflow.log_params(config_params(cfg))
            storage.write_text(id_file, run.info.run_id + "\n")
        self.mlflow = mlflow

    # --- per epoch ---

    def log_epoch(self, metrics: dict, checkpoint_dir: str | Path | None = None) -> None:
        """One epoch's scalars; the checkpoint becomes MLflow's ``best_checkpoint`` when the epoch is
        the best so far."""
        epoch = int(metrics["epoch"])
        scalars = scalar_metrics(metrics)
        if self.writer is not None:
            for name, value in scalars.items():
                self.writer.add_scalar(name, value, epoch)
            self.writer.flush()
            self._sync_tensorboard()
        if self.mlflow is not None:
            self.mlflow.log_metrics(scalars, step=epoch)
            if checkpoint_dir is not None and (self.best is None or best_key(metrics) > best_key(self.best)):
                self.best = metrics
                self.mlflow.log_artifacts(str(checkpoint_dir), artifact_path="best_checkpoint")
                self.mlflow.set_tag("best_epoch", epoch)

    def close(self, status: str = "FINISHED") -> None:
        if self.writer is not None:
            self.writer.close()
            self._sync_tensorboard()
            self.writer = None
        if self._tb_local is not None:
            shutil.rmtree(self._tb_local, ignore_errors=True)
            self._tb_local = None
        if self.mlflow is not None:
            self.mlflow.end_run(status=status)
            self.mlflow = None
