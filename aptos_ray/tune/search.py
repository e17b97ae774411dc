"""Ray Tune search around ``ray_train``: every trial is a distributed TorchTrainer run.

The pattern Ray Train V2 recommends (``Tuner(TorchTrainer(...))`` no longer works there): a
*function trainable* that builds and fits a ``TorchTrainer`` whose ``RunConfig`` carries
``ray.tune.integration.ray_train.TuneReportCallback``; rank 0's per-epoch metrics reach Tune
through it, so ASHA can stop a trial after any epoch.

Choices for small machines (2 CPU cores), measured:
- a trial's own driver takes no CPU (``tune.with_resources``, see ``tune.trial``): with its
  default 1 CPU, driver + 2 worker CPUs never fit on 2 cores and the search hangs without a word;
- every trial's worker group is checked against the cluster before the search starts (as a
  training run's), and at most ``tune.max_concurrent_trials`` trials run at once (0 -> as many
  worker groups as the cluster's nodes, or its autoscaler's node types, hold: GPUs and CPUs), so
  trials waiting for resources do not time out over and over;
- when ASHA stops a trial, Ray Train's placement-group cleaner frees its workers' CPUs; it
  needs the dashboard's state API (``ray[default]``, and ``ray_setup.local_ray_options`` so that
  it finds the right instance on a machine running several);
- the datasets are read and materialised once by this driver and handed to every trial
  (``tune.with_parameters``) instead of being read again per trial.

Layout of ``<tune.output>/<tune.name>/``: Ray Tune's experiment state and trial folders,
``search_config.yaml`` (the resolved config every trial starts from; a resume reuses it),
``runs/<trial_id>/`` (each a normal run directory: config.yaml, metrics.jsonl, summary.json,
plots/, checkpoint_epoch_NNNN/), and the search's ``trials.csv``, ``trials.md``,
``best_config.yaml`` and ``qwk_per_epoch.png``.
"""

from __future__ import annotations

import time
from pathlib import Path

from ray import tune as ray_tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.basic_variant import BasicVariantGenerator

from aptos_ray import storage
from aptos_ray.config import Config, config_from_dict, yaml_load
from aptos_ray.config_checks import check_tune_space
from aptos_ray.data.embedded import check_validation_split, ensure_dataset, record_preprocessing
from aptos_ray.errors import ExistingFileError, MissingFileError, SearchInterrupted
from aptos_ray.ownership import claimed, fresh_name, latest_name
from aptos_ray.ray_setup import check_seen_by_every_node, init_ray
from aptos_ray.train.loop import DatasetInfo
from aptos_ray.train.ray_backend import check_cluster_fits, load_datasets, runs_that_fit
from aptos_ray.train.tracking import file_store_uri
from aptos_ray.tune import trust
from aptos_ray.tune.results import (
    METRIC,
    SearchFailed,
    markdown,
    saved_trials,
    trials_table,
    write_outputs,
    write_trial_runs,
)
from aptos_ray.tune.space import plain, search_space
from aptos_ray.tune.trial import fit_trial, trial_trainable, trials_run_config

__all__ = ["SearchFailed", "SearchInterrupted", "run_search"]

MODE = "max"
TIME_ATTR = "epochs_done"  # 1-based epoch count: stays right when a trial's run resumes
SEARCH_CONFIG = "search_config.yaml"
# trials at once when the cluster's autoscaler sets no limit on the nodes it starts
TRIALS_AT_ONCE_UNBOUNDED = 64


# --- one trial -----------------------------------------------------------------------------------


def trial_config(base: dict, params: dict, output: str, name: str) -> Config:
    """The base config with a trial's sampled values, writing its run to ``output/name``."""
    cfg = config_from_dict(base)
    for key, value in params.items():
        cfg.set_value(key, plain(value))
    cfg.train.output = output
    cfg.train.name = name
    cfg.train.resume = False  # a rerun trial resumes anyway: Ray Train restores a run of the same name
    return cfg


class EpochReport(TuneReportCallback):
    """Tune's Train->Tune bridge, plus ``epochs_done`` (1-based) for ASHA's time axis."""

    def after_report(self, run_context, metrics, checkpoint):
        first = dict(metrics[0])
        first[TIME_ATTR] = int(first["epoch"]) + 1
        super().after_report(run_context, [first, *metrics[1:]], checkpoint)


def run_trial(params: dict, *, base: dict, info: dict, datasets: dict, runs_dir: str) -> None:
    """The function trainable: one TorchTrainer run named after the trial."""
    fit_trial(trial_config(base, params, runs_dir, ray_tune.get_context().get_trial_id()), info, datasets,
              callbacks=[EpochReport()])


# --- the search ----------------------------------------------------------------------------------


def experiment_name(cfg: Config) -> str:
    """Given, the latest experiment under tune.output for tune.resume, or a timestamp."""
    if cfg.tune.name:
        return cfg.tune.name
    if cfg.tune.resume:
        name = latest_name(cfg.tune.output, "tuner.pkl")
        if name is None:
            raise MissingFileError(f"tune.resume: no search found under {cfg.tune.output}; pass --tune.name")
        return name
    return fresh_name(storage.absolute(cfg.tune.output), "tune")


def _restore_location(exp_dir: str) -> dict:
    """``path`` (and ``storage_filesystem``) of a search for ``Tuner.restore`` / ``can_restore``."""
    location = storage.ray_storage(exp_dir)
    return {"path": location.pop("storage_path"), **location}


def check_experiment_dir(cfg: Config, exp_dir: str) -> None:
    started = ray_tune.Tuner.can_restore(**_restore_location(exp_dir))
    if cfg.tune.resume and not started:
        raise MissingFileError(f"tune.resume: {exp_dir} holds no search to resume")
    if started and not cfg.tune.resume:
        raise ExistingFileError(f"{exp_dir} already holds a search: pass --tune.resume=true to continue it "
                              "or pick another --tune.name")


def trial_shapes(cfg: Config, params: dict) -> list[Config]:
    """Configs with every worker group the trials can ask for: the base config, and one per value
    (the upper end of a range) of every ``scaling.*`` key the space searches."""
    shapes = [cfg]
    for key, (kind, args) in params.items():
        if not key.startswith("scaling."):
            continue
        values = list(args) if kind in ("choice", "grid") else [args[1] - 1 if kind == "randint" else args[1]]
        for value in values:
            shape = config_from_dict(cfg.to_dict())
            shape.set_value(key, plain(value))
            shapes.append(shape)
    return shapes


def check_trials_fit(cfg: Config, params: dict) -> None:
    """Every trial's worker group must fit the cluster (as a training run's must): a trial that can
    never get its GPUs would wait for Ray Train's worker-group start-up, retried without end."""
    for shape in trial_shapes(cfg, params):
        check_cluster_fits(shape)


def concurrent_trials(cfg: Config, params: dict) -> int:
    """tune.max_concurrent_trials, or (0) as many trials as the cluster holds at once (GPUs and
    CPUs, the largest trial's worker group), at least 1."""
    if cfg.tune.max_concurrent_trials > 0:
        return cfg.tune.max_concurrent_trials
    return min(runs_that_fit(shape.scaling, most=TRIALS_AT_ONCE_UNBOUNDED) for shape in trial_shapes(cfg, params))


def searcher(cfg: Config, max_concurrent: int):
    """Random (seeded: a search is repeatable) or Optuna, running at most ``max_concurrent`` trials."""
    if cfg.tune.search == "random":
        # Tune ignores TuneConfig.max_concurrent_trials for a BasicVariantGenerator passed in:
        # the limit has to be given here.
        return BasicVariantGenerator(random_state=cfg.train.seed, max_concurrent=max_concurrent)
    # optuna (config.validate checked it is installed and the space has no grid)
    from ray.tune.search.optuna import OptunaSearch

    return ConcurrencyLimiter(OptunaSearch(seed=cfg.train.seed), max_concurrent=max_concurrent)


def tracking_callbacks(cfg: Config, exp_dir: str) -> list:
    """Ray's own logger callbacks for tune.tracking (none | tensorboard | mlflow; config.validate
    checked the package is installed)."""
    choice = cfg.tune.tracking
    if choice == "tensorboard":
        from ray.tune.logger import TBXLoggerCallback

        return [TBXLoggerCallback()]
    if choice == "mlflow":
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        uri = exp_dir if storage.is_uri(exp_dir) else file_store_uri(str(Path(exp_dir, "mlruns")))
        return [MLflowLoggerCallback(tracking_uri=uri, experiment_name=Path(exp_dir).name)]
    return []


def build_tuner(cfg: Config, trainable, exp_dir: str, params: dict) -> ray_tune.Tuner:
    if cfg.tune.resume:
        # Finished trials stay finished; unfinished and errored ones run again, and their
        # TorchTrainer continues from its run's last checkpoint.
        return ray_tune.Tuner.restore(**_restore_location(exp_dir), trainable=trainable, resume_errored=True)
    max_concurrent = concurrent_trials(cfg, params)
    print(f"At most {max_concurrent} trial(s) at a time, {cfg.scaling.num_workers} worker(s) each")
    scheduler = ASHAScheduler(time_attr=TIME_ATTR, max_t=cfg.train.epochs, grace_period=cfg.tune.grace_period,
                              reduction_factor=cfg.tune.reduction_factor)
    return ray_tune.Tuner(
        trainable,
        param_space=search_space(cfg),
        tune_config=ray_tune.TuneConfig(
            metric=METRIC, mode=MODE, scheduler=scheduler, search_alg=searcher(cfg, max_concurrent),
            num_samples=cfg.tune.num_samples,
        ),
        run_config=trials_run_config(cfg.tune.name, cfg.tune.output, tracking_callbacks(cfg, exp_dir)),
    )


# --- the job -------------------------------------------------------------------------------------


def search_config(cfg: Config, exp_dir: str) -> Config:
    """The config the search runs with. A new search saves its resolved config beside the
    experiment; a resume reloads it, so unfinished trials continue with the settings they
    started with, whatever else the resuming command line says."""
    path = storage.join(exp_dir, SEARCH_CONFIG)
    if not cfg.tune.resume:
        cfg.data.dataset = storage.absolute(cfg.data.dataset)
        cfg.train.output = storage.absolute(cfg.train.output)
        cfg.save(path)
        return cfg
    if not storage.exists(path):
        raise MissingFileError(f"tune.resume: {path} not found (the search was not started by jobs/tune.py)")
    saved = config_from_dict(yaml_load(storage.read_text(path)))  # the loader that refuses alias bombs
    saved.tune.resume = True
    print(f"Resuming with the search's saved config {path}")
    return saved


def run_search(cfg: Config) -> dict:
    """Run (or resume) the search described by ``cfg.tune``; returns where its outputs are."""
    cfg.tune.name = experiment_name(cfg)
    exp_dir = storage.join(storage.absolute(cfg.tune.output), cfg.tune.name)
    with claimed(exp_dir, "search", "wait for it to end, or pick another --tune.name"):
        return search_claimed(cfg, exp_dir)


def search_claimed(cfg: Config, exp_dir: str) -> dict:
    """The search, once this process holds its folder (``ownership.claimed``)."""
    check_experiment_dir(cfg, exp_dir)
    if cfg.tune.resume:
        trust.verify(exp_dir)  # before Ray unpickles anything of it
    if not cfg.tune.resume:  # a bad space, schedule, searcher or tracker fails before anything starts
        cfg.validate(list(Config.__dataclass_fields__))  # the space, schedule, model; as the command line does
        searcher(cfg, 1)
        tracking_callbacks(cfg, exp_dir)
    cfg = search_config(cfg, exp_dir)
    space = check_tune_space(cfg)
    params = list(space)
    runs_dir = storage.join(exp_dir, "runs")
    manifest = ensure_dataset(cfg)
    if not cfg.data.folds:
        check_validation_split(cfg, manifest)
    record_preprocessing(cfg, manifest)
    info = DatasetInfo.for_data(cfg.data, manifest)
    print(cfg.summary())
    print(f"Search directory: {exp_dir}")

    init_ray(cfg.scaling)
    check_trials_fit(cfg, space)
    check_seen_by_every_node({"data.dataset": storage.join(cfg.data.dataset, "manifest.json")})
    started = time.perf_counter()
    # (init_ray turned Ray Data's progress bars off, unless --verbose: every epoch of every trial
    # would draw them and drown Tune's status table.)
    datasets = load_datasets(cfg)  # once, shared by every trial
    print(f"Datasets loaded in {time.perf_counter() - started:.1f}s")
    trainable = trial_trainable(run_trial, base=cfg.to_dict(), info=info.__dict__, datasets=datasets, runs_dir=runs_dir)
    tuner = build_tuner(cfg, trainable, exp_dir, space)
    try:
        results = tuner.fit()
    finally:  # finished, interrupted or failed: what Tune saved is this search's, and may be resumed
        trust.sign(exp_dir)

    table, records = trials_table(results, runs_dir, cfg.train.epochs, saved_trials(exp_dir))
    write_trial_runs(table, records)
    paths = write_outputs(cfg, table, records, exp_dir, params)
    trial_epochs = int(table["epochs"].sum())
    interrupted = (table["status"] == "unfinished").any()
    state = "interrupted" if interrupted else "done"
    print(f"\nSearch {state} after {time.perf_counter() - started:.0f}s: {len(table)} trials, "
          f"{trial_epochs} trial-epochs (a full run of every trial: {len(table) * cfg.train.epochs})\n")
    print(markdown(table))
    print(f"best config so far: {paths['best_config.yaml']}" if interrupted else
          f"best config: {paths['best_config.yaml']}\n  train it: python jobs/train.py --config "
          f"{paths['best_config.yaml']}")
    if interrupted:
        raise SearchInterrupted(f"search interrupted; continue it with --tune.name={cfg.tune.name} "
                                "--tune.resume=true")
    return {"exp_dir": exp_dir, "table": table, "trial_epochs": trial_epochs, **paths}
