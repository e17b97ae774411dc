"""Ray Tune search around ``ray_train``: every trial is a distributed TorchTrainer run.

The pattern Ray Train V2 recommends (``Tuner(TorchTrainer(...))`` no longer works there): a
*function trainable* that builds and fits a ``TorchTrainer`` whose ``RunConfig`` carries
``ray.tune.integration.ray_train.TuneReportCallback``; rank 0's per-epoch metrics reach Tune
through it, so ASHA can stop a trial after any epoch.

Choices for small machines (2 CPU cores), measured:
- a trial's own driver takes no CPU (``tune.with_resources``, see ``make_trainable``): with its
  default 1 CPU, driver + 2 worker CPUs never fit on 2 cores and the search hangs without a word;
- at most ``tune.max_concurrent_trials`` trials run at once (0 -> cluster CPUs // CPUs of one
  trial's workers), so trials waiting for CPUs do not time out over and over;
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

import importlib.util
import math
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.fs as pafs
import ray
import yaml
from ray import tune as ray_tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.basic_variant import BasicVariantGenerator

from aptos_ray import plots, storage
from aptos_ray.config import Config, ConfigError, config_from_dict, resolve_key, set_value
from aptos_ray.errors import ExistingFileError, MissingFileError
from aptos_ray.loop import DatasetInfo, RunFiles
from aptos_ray.ray_setup import init_ray
from aptos_ray.ray_train import build_trainer, load_datasets
from aptos_ray.train import ensure_dataset, summarise

METRIC = "val_qwk"
MODE = "max"
TIME_ATTR = "epochs_done"  # 1-based epoch count: stays right when a trial's run resumes
SEARCH_CONFIG = "search_config.yaml"
TRIAL_DRIVER_MEMORY = 2**20  # bytes of Ray's logical "memory" resource: a non-empty request, no CPU
SPEC_KINDS = ("loguniform", "uniform", "choice", "randint", "grid")
# Fields every trial sets itself, or that only the search driver reads.
NOT_SEARCHABLE = {"train.name", "train.output", "train.resume", "train.local", "train.epochs", "scaling.address"}


class SearchInterrupted(RuntimeError):
    """The search stopped before every trial finished (e.g. Ctrl+C); its state is saved."""


class SearchFailed(RuntimeError):
    """No trial finished a single epoch."""


# --- search space --------------------------------------------------------------------------------


def _check_values(key: str, values: list) -> None:
    """Each value must be one the config field accepts (same check as a YAML file or --key=value)."""
    scratch = Config()
    for value in values:
        try:
            set_value(scratch, key, value)
        except ConfigError as e:
            raise ConfigError(f"tune.space['{key}']: {e}") from None


def _domain(key: str, spec: Any):
    """One ``{"kind": args}`` spec -> a Ray Tune domain, with a clear error for a bad one."""
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in SPEC_KINDS:
        raise ConfigError(f"tune.space['{key}'] must be one of {{kind: args}} with kind in "
                          f"{', '.join(SPEC_KINDS)}; got {spec!r}")
    kind, args = next(iter(spec.items()))
    if kind in ("choice", "grid"):
        if not isinstance(args, list) or not args:
            raise ConfigError(f"tune.space['{key}']: {kind} needs a non-empty list, got {args!r}")
        _check_values(key, args)
        # grid: every value, each tune.num_samples times (random search only)
        return ray_tune.choice(args) if kind == "choice" else ray_tune.grid_search(args)
    if not (isinstance(args, list) and len(args) == 2 and all(isinstance(a, (int, float)) for a in args)):
        raise ConfigError(f"tune.space['{key}']: {kind} needs [low, high], got {args!r}")
    low, high = args
    if not low < high:
        raise ConfigError(f"tune.space['{key}']: {kind} needs low < high, got {args!r}")
    if kind == "randint":  # Tune's randint excludes high
        _check_values(key, [int(low), int(high) - 1])
        return ray_tune.randint(int(low), int(high))
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"tune.space['{key}']: loguniform needs low > 0, got {args!r}")
    _check_values(key, [float(low), float(high), (low + high) / 2.0])
    return ray_tune.loguniform(low, high) if kind == "loguniform" else ray_tune.uniform(low, high)


def search_space(space: dict) -> dict[str, Any]:
    """``tune.space`` -> Ray Tune domains keyed by the full dotted config key ('lr' -> 'optim.lr')."""
    if not isinstance(space, dict) or not space:
        raise ConfigError("tune.space is empty: give at least one 'section.key: {kind: args}'")
    domains = {}
    for key, spec in space.items():
        section, name = resolve_key(str(key))
        full = f"{section}.{name}"
        if section == "tune" or full in NOT_SEARCHABLE:
            raise ConfigError(f"tune.space: '{full}' cannot be searched (the search sets it itself)")
        domains[full] = _domain(full, spec)
    return domains


# --- one trial -----------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """numpy scalars (from Tune's samplers) -> Python ones, which the typed config accepts."""
    return value.item() if hasattr(value, "item") else value


def trial_config(base: dict, params: dict, output: str, name: str) -> Config:
    """The base config with a trial's sampled values, writing its run to ``output/name``."""
    cfg = config_from_dict(base)
    for key, value in params.items():
        set_value(cfg, key, _plain(value))
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
    trial_id = ray_tune.get_context().get_trial_id()
    cfg = trial_config(base, params, runs_dir, trial_id)
    trainer = build_trainer(cfg, DatasetInfo(**info), datasets, callbacks=[EpochReport()])
    trainer.fit()  # Train V2 raises on failure, so Tune marks the trial as errored


# --- the search ----------------------------------------------------------------------------------


def experiment_name(cfg: Config) -> str:
    """Given, the latest experiment under tune.output for tune.resume, or a timestamp."""
    if cfg.tune.name:
        return cfg.tune.name
    if cfg.tune.resume:
        found = sorted(Path(cfg.tune.output).glob("*/tuner.pkl"), key=lambda p: p.stat().st_mtime)
        if not found:
            raise MissingFileError(f"tune.resume: no search found under {cfg.tune.output}; pass --tune.name")
        return found[-1].parent.name
    return datetime.now().strftime("tune-%Y%m%d-%H%M%S")


def check_experiment_dir(cfg: Config, exp_dir: str) -> None:
    started = ray_tune.Tuner.can_restore(exp_dir)
    if cfg.tune.resume and not started:
        raise MissingFileError(f"tune.resume: {exp_dir} holds no search to resume")
    if started and not cfg.tune.resume:
        raise ExistingFileError(f"{exp_dir} already holds a search: pass --tune.resume=true to continue it "
                              "or pick another --tune.name")


def check_schedule(cfg: Config) -> None:
    if cfg.train.epochs < 1:
        raise ConfigError("train.epochs must be >= 1")
    if not 1 <= cfg.tune.grace_period <= cfg.train.epochs:
        raise ConfigError(f"tune.grace_period must be in [1, train.epochs={cfg.train.epochs}], "
                          f"got {cfg.tune.grace_period}")
    if cfg.tune.reduction_factor < 2:
        raise ConfigError(f"tune.reduction_factor must be >= 2, got {cfg.tune.reduction_factor}")
    if cfg.tune.num_samples < 1:
        raise ConfigError(f"tune.num_samples must be >= 1, got {cfg.tune.num_samples}")


def concurrent_trials(cfg: Config) -> int:
    """tune.max_concurrent_trials, or (0) as many trials as the cluster's CPUs fit, at least 1."""
    if cfg.tune.max_concurrent_trials > 0:
        return cfg.tune.max_concurrent_trials
    per_trial = cfg.scaling.num_workers * cfg.scaling.cpus_per_worker
    cpus = ray.cluster_resources().get("CPU", 0)
    fits = int(cpus // per_trial) if per_trial > 0 else 1
    if fits < 1:
        print(f"warning: one trial's workers need {per_trial:g} CPUs, the cluster has {cpus:g}: "
              "trials wait for the cluster to grow")
    return max(fits, 1)


def searcher(cfg: Config, max_concurrent: int):
    """Random (seeded: a search is repeatable) or Optuna, running at most ``max_concurrent`` trials."""
    if cfg.tune.search == "random":
        # Tune ignores TuneConfig.max_concurrent_trials for a BasicVariantGenerator passed in:
        # the limit has to be given here.
        return BasicVariantGenerator(random_state=cfg.train.seed, max_concurrent=max_concurrent)
    if cfg.tune.search == "optuna":
        grids = [k for k, spec in cfg.tune.space.items() if isinstance(spec, dict) and "grid" in spec]
        if grids:
            raise ConfigError(f"tune.search=optuna cannot search a grid ({', '.join(grids)}): use choice")
        if importlib.util.find_spec("optuna") is None:
            raise ConfigError("tune.search=optuna needs optuna: pip install optuna")
        from ray.tune.search.optuna import OptunaSearch

        return ConcurrencyLimiter(OptunaSearch(seed=cfg.train.seed), max_concurrent=max_concurrent)
    raise ConfigError(f"tune.search must be random or optuna, got '{cfg.tune.search}'")


def tracking_callbacks(cfg: Config, exp_dir: str) -> list:
    """Ray's own logger callbacks for tune.tracking (none | tensorboard | mlflow)."""
    choice = cfg.tune.tracking
    if choice == "none":
        return []
    if choice == "tensorboard":
        if importlib.util.find_spec("tensorboardX") is None:
            raise ConfigError("tune.tracking=tensorboard needs tensorboardX: pip install tensorboardX")
        from ray.tune.logger import TBXLoggerCallback

        return [TBXLoggerCallback()]
    if choice == "mlflow":
        if importlib.util.find_spec("mlflow") is None:
            raise ConfigError("tune.tracking=mlflow needs mlflow: pip install mlflow")
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        uri = exp_dir if storage.is_uri(exp_dir) else Path(exp_dir, "mlruns").as_uri()
        return [MLflowLoggerCallback(tracking_uri=uri, experiment_name=Path(exp_dir).name)]
    raise ConfigError(f"tune.tracking must be none, tensorboard or mlflow, got '{choice}'")


def make_trainable(cfg: Config, info: DatasetInfo, datasets: dict, runs_dir: str):
    trainable = ray_tune.with_parameters(run_trial, base=cfg.to_dict(), info=info.__dict__,
                                         datasets=datasets, runs_dir=runs_dir)
    # The trial's driver only waits on its TorchTrainer: no CPU (see module docstring). Tune
    # refuses an all-zero request, so it asks for 1 MiB of Ray's "memory" resource instead.
    return ray_tune.with_resources(trainable, {"CPU": 0, "memory": TRIAL_DRIVER_MEMORY})


def build_tuner(cfg: Config, trainable, exp_dir: str) -> ray_tune.Tuner:
    if cfg.tune.resume:
        # Finished trials stay finished; unfinished and errored ones run again, and their
        # TorchTrainer continues from its run's last checkpoint.
        return ray_tune.Tuner.restore(exp_dir, trainable=trainable, resume_errored=True)
    max_concurrent = concurrent_trials(cfg)
    print(f"At most {max_concurrent} trial(s) at a time, {cfg.scaling.num_workers} worker(s) each")
    scheduler = ASHAScheduler(time_attr=TIME_ATTR, max_t=cfg.train.epochs, grace_period=cfg.tune.grace_period,
                              reduction_factor=cfg.tune.reduction_factor)
    return ray_tune.Tuner(
        trainable,
        param_space=search_space(cfg.tune.space),
        tune_config=ray_tune.TuneConfig(
            metric=METRIC, mode=MODE, scheduler=scheduler, search_alg=searcher(cfg, max_concurrent),
            num_samples=cfg.tune.num_samples,
        ),
        run_config=ray_tune.RunConfig(
            name=cfg.tune.name,
            storage_path=storage.absolute(cfg.tune.output),
            callbacks=tracking_callbacks(cfg, exp_dir),
            # A worker failure is already retried by the trial's TorchTrainer (scaling.max_failures).
            failure_config=ray_tune.FailureConfig(max_failures=0),
        ),
    )


# --- results -------------------------------------------------------------------------------------


def reported_epochs(result) -> int:
    """Epochs whose report (and checkpoint) reached Tune."""
    df = result.metrics_dataframe
    if df is None or df.empty or TIME_ATTR not in df:
        return 0
    return int(df[TIME_ATTR].max())


def live_trainer_actors() -> int | None:
    """Ray Train controller and worker actors alive in the cluster (None without the state API)."""
    from ray.util.state import list_actors

    try:
        alive = list_actors(filters=[("state", "=", "ALIVE")], limit=10_000, raise_on_missing_output=False)
    except Exception:  # no dashboard / state API: nothing to wait on
        return None
    return sum(a.class_name in ("TrainController", "RayTrainWorker") for a in alive)


def wait_for_stopped_trainers(before: int | None, timeout_s: float = 30.0) -> None:
    """Wait (at most ``timeout_s``) until no more Ray Train actors are alive than ``before`` the search.

    When ASHA stops a trial, the trial's TorchTrainer controller and workers are torn down only
    after the trial itself: for a moment they keep training and writing their run directory (in
    tests, a whole short epoch, or a restart from scratch by the controller). Aligning the run
    directories before they are gone would race with those writes.
    """
    deadline = time.monotonic() + timeout_s
    while before is not None and time.monotonic() < deadline:
        now = live_trainer_actors()
        if now is None or now <= before:
            return
        time.sleep(0.5)


def align_run_dir(run_dir: str, epochs: int) -> list[dict]:
    """Forget epochs that a stopped trial finished after its last report reached Tune.

    ASHA's stop is asynchronous: the trial's workers may finish one more epoch (a line in
    metrics.jsonl, perhaps a checkpoint) before they are killed, but that epoch never reached
    Tune, and its checkpoint may never have been written. The history is cut back to what was
    reported, so a trial's best epoch always has a kept checkpoint; folders are left alone.
    """
    files = RunFiles(run_dir)
    history = files.history()
    if len(history) > epochs:
        files.keep_epochs_before(epochs)
        history = history[:epochs]
        if history:
            files.write_plots(history)
    return history


def saved_trials(exp_dir: str) -> dict[str, tuple[str, str]]:
    """Trial folder name -> (trial id, status), as saved for a resume. The status is TERMINATED or
    ERROR once a trial finished, PENDING or PAUSED when the search was interrupted (Ctrl+C) before
    it did; the statuses in memory after an interrupt say TERMINATED, hence the saved state. The
    folder name identifies also a trial that errored before its first report."""
    return {Path(t.path).name: (t.trial_id, t.status) for t in ray_tune.ExperimentAnalysis(exp_dir).trials}


def trials_table(results, runs_dir: str, max_epochs: int, trials: dict[str, tuple[str, str]]) -> tuple[pd.DataFrame, dict]:
    """One row per trial (searched values, epochs, best QWK and epoch, seconds, status; best
    first) and every trial's per-epoch history."""
    rows, histories = [], {}
    for result in results:
        trial_id, tune_status = trials[Path(result.path).name]
        run_dir = storage.join(runs_dir, trial_id)
        finished = tune_status in ("TERMINATED", "ERROR")
        # An unfinished trial's run dir is left as is: its TorchTrainer resumes from it.
        history = align_run_dir(run_dir, reported_epochs(result)) if finished else RunFiles(run_dir).history()
        histories[trial_id] = history
        best = max(history, key=lambda h: h[METRIC]) if history else {}
        if result.error:
            status = "error"
        elif not finished:
            status = "unfinished"
        else:
            status = "completed" if len(history) >= max_epochs else "stopped early"
        rows.append({
            "trial_id": trial_id,
            **{k: _plain(v) for k, v in result.config.items()},
            "epochs": len(history),
            "best_val_qwk": best.get(METRIC, math.nan),
            "best_epoch": best.get("epoch", -1),
            "seconds": round(float((result.metrics or {}).get("time_total_s", math.nan)), 1),
            "status": status,
            "run_dir": run_dir,
        })
    table = pd.DataFrame(rows)
    # trial_id breaks ties: a restored search prints the same table
    table = table.sort_values(["best_val_qwk", "trial_id"], ascending=[False, True], na_position="last")
    table = table.reset_index(drop=True)
    return table, histories


def markdown(table: pd.DataFrame) -> str:
    """A GitHub table without the tabulate package."""
    def cell(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    shown = table.drop(columns=["run_dir"])
    lines = ["| " + " | ".join(shown.columns) + " |", "|" + "---|" * len(shown.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in shown.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def best_config(base: Config, best_row: dict, params: list[str]) -> Config:
    """A full resolved config that ``jobs/train.py --config`` accepts as is (name cleared)."""
    cfg = config_from_dict(base.to_dict())
    for key in params:
        set_value(cfg, key, _plain(best_row[key]))
    cfg.train.name = ""
    cfg.train.resume = False
    cfg.tune.resume = False
    return cfg


def qwk_curves_png(table: pd.DataFrame, histories: dict[str, list[dict]], params: list[str]) -> bytes:
    curves = {}
    for row in table.to_dict("records"):  # records: dotted column names are no attribute names
        values = ", ".join(_short(k, row.get(k)) for k in params)
        curves[f"{row['trial_id']} {values}"] = [(h["epoch"], h[METRIC]) for h in histories[row["trial_id"]]]
    return plots.qwk_curves(curves, title="Validation QWK per trial")


def _short(key: str, value: Any) -> str:
    shown = f"{value:.3g}" if isinstance(value, float) else str(value)
    return f"{key.split('.')[-1]}={shown}"


def write_outputs(cfg: Config, table: pd.DataFrame, histories: dict, exp_dir: str, params: list[str]) -> dict:
    paths = {name: storage.join(exp_dir, name) for name in
             ("trials.csv", "trials.md", "best_config.yaml", "qwk_per_epoch.png")}
    storage.write_text(paths["trials.csv"], table.to_csv(index=False))
    storage.write_text(paths["trials.md"], markdown(table))
    finished = table[table["epochs"] > 0]
    if finished.empty:
        raise SearchFailed(f"no trial finished an epoch; the first error:\n{first_error(exp_dir)}")
    storage.write_bytes(paths["qwk_per_epoch.png"], qwk_curves_png(table, histories, params))
    # a record, not .iloc[0]: a row Series of mixed columns turns ints into floats
    best_config(cfg, finished.to_dict("records")[0], params).save(paths["best_config.yaml"])
    return paths


def first_error(exp_dir: str) -> str:
    """The end of the first trial error Tune saved (error.txt in the trial folder)."""
    fs, inner = storage.filesystem(exp_dir)
    for info in sorted(fs.get_file_info(pafs.FileSelector(inner, recursive=True)), key=lambda i: i.path):
        if info.base_name == "error.txt":
            with fs.open_input_stream(info.path) as f:
                return "\n".join(f.read().decode(errors="replace").strip().splitlines()[-3:])
    return "(none saved)"


def summarise_trials(table: pd.DataFrame) -> None:
    """summary.json in every trial's run directory, as a train run has."""
    for row in table.to_dict("records"):
        if row["epochs"] > 0:
            summarise(row["run_dir"], 0.0 if math.isnan(row["seconds"]) else row["seconds"])


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
    saved = config_from_dict(yaml.safe_load(storage.read_text(path)))
    saved.tune.resume = True
    print(f"Resuming with the search's saved config {path}")
    return saved


def run_search(cfg: Config) -> dict:
    """Run (or resume) the search described by ``cfg.tune``; returns where its outputs are."""
    cfg.tune.name = experiment_name(cfg)
    exp_dir = storage.join(storage.absolute(cfg.tune.output), cfg.tune.name)
    check_experiment_dir(cfg, exp_dir)
    if not cfg.tune.resume:  # a bad space, schedule, searcher or tracker fails before anything starts
        check_schedule(cfg)
        search_space(cfg.tune.space)
        searcher(cfg, 1)
        tracking_callbacks(cfg, exp_dir)
    cfg = search_config(cfg, exp_dir)
    params = list(search_space(cfg.tune.space))
    runs_dir = storage.join(exp_dir, "runs")
    info = DatasetInfo.from_manifest(ensure_dataset(cfg))
    print(cfg.summary())
    print(f"Search directory: {exp_dir}")

    init_ray(cfg.scaling)
    started = time.perf_counter()
    # A Dataset keeps the DataContext it was made with: without this, every epoch of every trial
    # draws Ray Data progress bars that drown Tune's status table.
    ray.data.DataContext.get_current().enable_progress_bars = False
    datasets = load_datasets(cfg)  # once, shared by every trial
    print(f"Datasets loaded in {time.perf_counter() - started:.1f}s")
    tuner = build_tuner(cfg, make_trainable(cfg, info, datasets, runs_dir), exp_dir)
    trainers_before = live_trainer_actors()
    results = tuner.fit()
    wait_for_stopped_trainers(trainers_before)

    table, histories = trials_table(results, runs_dir, cfg.train.epochs, saved_trials(exp_dir))
    summarise_trials(table)
    paths = write_outputs(cfg, table, histories, exp_dir, params)
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
