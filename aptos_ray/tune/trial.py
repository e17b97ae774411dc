"""One Ray Tune trial as one TorchTrainer run: what the search's trials and the cross-validation's
folds share.

Each is a *function trainable* (the pattern Ray Train V2 recommends) that saves its run's config and
fits a ``TorchTrainer``. The datasets are read once by the job's driver and handed to every trial
(``tune.with_parameters``); a trial's own driver only waits on its TorchTrainer, so it asks for no CPU.
"""

from __future__ import annotations

from collections.abc import Callable

from ray import tune as ray_tune
from ray.train import Result

from aptos_ray import storage
from aptos_ray.config import Config
from aptos_ray.train.loop import DatasetInfo
from aptos_ray.train.ray_backend import build_trainer

# Bytes of Ray's logical "memory" resource a trial's driver asks for: with its default 1 CPU, a
# driver plus 2 worker CPUs never fit on 2 cores and the trials wait without a word. Tune refuses an
# all-zero request, hence a tiny non-empty one.
TRIAL_DRIVER_MEMORY = 2**20


def trial_trainable(trial: Callable, **shared) -> Callable:
    """``trial(params, **shared)`` as Tune's trainable: ``shared`` (datasets, the base config) is put
    in the object store once for every trial, and the trial's driver takes no CPU."""
    trainable = ray_tune.with_parameters(trial, **shared)
    return ray_tune.with_resources(trainable, {"CPU": 0, "memory": TRIAL_DRIVER_MEMORY})


def fit_trial(cfg: Config, info: dict, datasets: dict, callbacks: list | None = None) -> Result:
    """The trial's run at ``train.output/train.name``: its config.yaml saved there (as the train
    driver does for its runs), then fitted. Train V2 raises on failure, so Tune marks the trial errored."""
    cfg.save(storage.join(cfg.train.output, cfg.train.name, "config.yaml"))
    return build_trainer(cfg, DatasetInfo(**info), datasets, callbacks=callbacks).fit()


def trials_run_config(name: str, output: str, callbacks: list | None = None) -> ray_tune.RunConfig:
    """Tune's state at ``output/name`` (a local path or URI). A worker failure is already retried by
    the trial's TorchTrainer (``scaling.max_failures``): Tune does not run the trial again."""
    return ray_tune.RunConfig(name=name, **storage.ray_storage(output), callbacks=callbacks,
                              failure_config=ray_tune.FailureConfig(max_failures=0))
