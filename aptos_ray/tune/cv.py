"""The cross-validation job (jobs/cv.py): one training run per fold, then out-of-fold predictions.

With Ray the folds are Ray Tune trials over the key ``data.fold`` (a grid, no early stopping: every
fold trains its full schedule), each a TorchTrainer run as in ``tune.search``, as many at once as the
cluster holds (GPUs and CPUs; ``cv.max_concurrent_folds``). Every split's rows are read once by this
driver (materialised when ``data.materialize`` says so: one copy in the object store, not one per
fold) and each fold's train/val rows filtered from them before the trials start (a trial that read
data itself would wait for CPUs the other trials' workers hold). The out-of-fold predictions then run
in the predict job's Ray Data actor pool. With ``--local`` the folds train one after another in this
process, which also predicts out of fold. Cut-points and referral operating point are then
``tune.cv_results``'.

Layout of ``<cv.output>/<cv.name>/``: ``config.yaml`` (the config every fold starts from),
``folds.csv`` (id, grade, dup_group, fold), ``fold_K/`` (each a normal run directory), ``tune/``
(Ray Tune's state, Ray runs only), ``oof.parquet``, ``cv.json`` (the deployed cut-points and
referral point, per-fold and pooled figures) and ``cv.md`` (the table).

A stopped cross-validation (killed, a power cut) continues with ``--resume --cv.name=NAME`` and the
same config: folds that finished are kept, the fold in progress continues from its last checkpoint.
"""

from __future__ import annotations

import copy
import json
import time
from typing import TYPE_CHECKING

from aptos_ray import storage
from aptos_ray.config import Config, config_from_dict
from aptos_ray.config_checks import check_cv
from aptos_ray.data.embedded import ensure_dataset, record_preprocessing
from aptos_ray.data.folds import fold_table
from aptos_ray.errors import ExistingFileError
from aptos_ray.ownership import claimed, fresh_name
from aptos_ray.train.resume import check_resume, read_saved_config
from aptos_ray.tune.cv_results import CV_FILE, fold_name, markdown, oof_predictions, summarise, write_results

if TYPE_CHECKING:
    import pandas as pd


def fold_config(cfg: Config, fold: int, cv_dir: str) -> Config:
    """The config of fold ``fold``: validated on it, its run at ``<cv_dir>/fold_K``, continued from
    its last checkpoint when an earlier, stopped cross-validation got that far (--resume)."""
    from aptos_ray.train.driver import has_checkpoints

    out = copy.deepcopy(cfg)
    out.data.fold = fold
    out.train.output = cv_dir
    out.train.name = fold_name(fold)
    out.train.resume = cfg.train.resume and has_checkpoints(storage.join(cv_dir, out.train.name))
    return out


def finished_folds(cv_dir: str, n_folds: int) -> dict[int, dict]:
    """The folds whose run ended (its summary.json is written last): fold -> summary."""
    done = {k: storage.join(cv_dir, fold_name(k), "summary.json") for k in range(n_folds)}
    return {k: json.loads(storage.read_text(path)) for k, path in done.items() if storage.exists(path)}


def check_cv_dir(cfg: Config, cv_dir: str) -> None:
    """A new cross-validation needs a free name; --resume needs the one it continues, with the same config
    (other folds, epochs or data would mix two experiments in one table)."""
    saved = storage.join(cv_dir, "config.yaml")
    if not cfg.train.resume:
        if storage.exists(saved):
            raise ExistingFileError(f"{cv_dir} already holds a cross-validation: pass --resume to finish it "
                                    "or pick another --cv.name")
        return
    # Unlike a run's, a cross-validation's epochs may not grow: its folds would differ.
    check_resume(read_saved_config(saved, "cross-validation"), cfg, cv_dir, may_grow=())


# --- the folds, in this process or as Ray Tune trials ---------------------------------------------


def train_folds_local(cfg: Config, cv_dir: str, done: dict[int, dict]) -> dict[int, dict]:
    from aptos_ray.train.driver import train

    return {**done, **{k: train(fold_config(cfg, k, cv_dir)) for k in range(cfg.data.folds) if k not in done}}


def run_fold(params: dict, *, base: dict, infos: dict, datasets: dict, cv_dir: str) -> None:
    """Ray Tune's function trainable: fold ``params['data.fold']`` as a TorchTrainer run; its run files
    (summary.json, metrics.jsonl, plots) are written here, by the run's driver, when it ends."""
    from aptos_ray.train.checkpoint import record_from_result, write_run_files
    from aptos_ray.tune.trial import fit_trial

    fold = int(params["data.fold"])
    cfg = fold_config(config_from_dict(base), fold, cv_dir)
    started = time.perf_counter()
    result = fit_trial(cfg, infos[fold], datasets[fold])
    write_run_files(record_from_result(result, storage.join(cv_dir, cfg.train.name)), time.perf_counter() - started)


def concurrent_folds(cfg: Config) -> int:
    """cv.max_concurrent_folds, or (0) as many folds as the cluster holds at once (GPUs and CPUs)."""
    from aptos_ray.train.ray_backend import runs_that_fit

    if cfg.cv.max_concurrent_folds:
        return cfg.cv.max_concurrent_folds
    return runs_that_fit(cfg.scaling, most=cfg.data.folds)


def train_folds_ray(cfg: Config, cv_dir: str, manifest: dict, done: dict[int, dict]) -> dict[int, dict]:
    from ray import tune as ray_tune

    from aptos_ray.ray_setup import init_ray
    from aptos_ray.train.loop import DatasetInfo
    from aptos_ray.train.ray_backend import check_cluster_fits, load_cv_datasets
    from aptos_ray.tune.trial import trial_trainable, trials_run_config

    init_ray(cfg.scaling)
    check_cluster_fits(cfg)
    folds = [k for k in range(cfg.data.folds) if k not in done]
    configs = {k: fold_config(cfg, k, cv_dir) for k in folds}
    datasets = load_cv_datasets(cfg, configs)
    infos = {k: DatasetInfo.for_data(configs[k].data, manifest).__dict__ for k in folds}
    trainable = trial_trainable(run_fold, base=cfg.to_dict(), infos=infos, datasets=datasets, cv_dir=cv_dir)
    at_once = concurrent_folds(cfg)
    print(f"{len(folds)} folds to train, at most {at_once} at a time, {cfg.scaling.num_workers} worker(s) each")
    tuner = ray_tune.Tuner(
        trainable,
        param_space={"data.fold": ray_tune.grid_search(folds)},
        tune_config=ray_tune.TuneConfig(num_samples=1, max_concurrent_trials=at_once),
        run_config=trials_run_config("tune", cv_dir),
    )
    results = tuner.fit()
    if results.errors:
        raise RuntimeError(f"{len(results.errors)} fold(s) failed: {results.errors[0]}")
    return {**done, **finished_folds(cv_dir, cfg.data.folds)}


def oof_predictions_ray(cfg: Config, checkpoints: dict[int, str]) -> pd.DataFrame:
    """``oof_predictions`` on the cluster: every image graded by its own fold's model in the
    predict job's actor pool (``predict.batch_size``, ``predict.num_actors``, GPUs with
    ``scaling.use_gpu``), not in this driver process."""
    from aptos_ray.data.folds import with_folds
    from aptos_ray.data.format import read_manifest
    from aptos_ray.infer.grader import PROB_COLUMNS
    from aptos_ray.infer.predict import predict_folds
    from aptos_ray.ray_setup import init_ray
    from aptos_ray.train.ray_backend import read_pool

    init_ray(cfg.scaling)
    table = fold_table(cfg.data.dataset, cfg.data.folds, cfg.data.fold_seed).to_pandas()
    fold_of = dict(zip(table["id"].astype(str), table["fold"].astype(int)))
    ds = read_pool(cfg.data.dataset).map_batches(with_folds, batch_format="numpy", fn_kwargs={"fold_of": fold_of})
    rows = predict_folds(ds, checkpoints, cfg.cv.oof_tta, read_manifest(cfg.data.dataset).get("encoding", "raw"),
                         cfg.predict.batch_size, cfg.predict.num_actors, cfg.scaling)
    rows["id"] = rows["id"].astype(str)
    columns = ["id", "grade", "fold", "score", *[c for c in PROB_COLUMNS if c in rows]]
    return rows[columns].sort_values("id", kind="stable").reset_index(drop=True)


# --- the job ---------------------------------------------------------------------------------------


def run_cv(cfg: Config) -> dict:
    """Train every fold of ``data.folds``, predict each image with its own fold's model, choose the
    cut-points and referral point on those predictions; returns the summary (cv.json)."""
    check_cv(cfg)
    cfg.cv.name = cfg.cv.name or fresh_name(storage.absolute(cfg.cv.output), "cv")
    cv_dir = storage.join(storage.absolute(cfg.cv.output), cfg.cv.name)
    with claimed(cv_dir, "cross-validation", "wait for it to end, or pick another --cv.name"):
        return cv_claimed(cfg, cv_dir)


def cv_claimed(cfg: Config, cv_dir: str) -> dict:
    """The cross-validation, once this process holds its folder (``ownership.claimed``)."""
    cfg.data.dataset = storage.absolute(cfg.data.dataset)
    check_cv_dir(cfg, cv_dir)
    manifest = ensure_dataset(cfg)
    record_preprocessing(cfg, manifest)
    folds = fold_table(cfg.data.dataset, cfg.data.folds, cfg.data.fold_seed)
    storage.write_text(storage.join(cv_dir, "folds.csv"), folds.to_pandas().to_csv(index=False))
    if not cfg.train.resume:
        cfg.save(storage.join(cv_dir, "config.yaml"))
    print(cfg.summary())
    print(f"Cross-validation: {cv_dir}\n{folds.num_rows} images in {cfg.data.folds} folds of "
          f"{', '.join(str(n) for n in folds.to_pandas()['fold'].value_counts().sort_index())}")
    done = finished_folds(cv_dir, cfg.data.folds) if cfg.train.resume else {}
    if done:
        print(f"--resume: fold(s) {', '.join(map(str, sorted(done)))} already trained")
    started = time.perf_counter()
    runs = train_folds_local(cfg, cv_dir, done) if cfg.train.local else train_folds_ray(cfg, cv_dir, manifest, done)
    trained = time.perf_counter()
    key = f"{cfg.cv.oof_checkpoint}_checkpoint"
    checkpoints = {k: run[key] for k, run in runs.items()}
    oof = oof_predictions(cfg, checkpoints) if cfg.train.local else oof_predictions_ray(cfg, checkpoints)
    summary, scored = summarise(oof, cfg.cv.target_sensitivity, {k: run["wall_seconds"] for k, run in runs.items()},
                                cfg.cv.cut_rule)
    summary.update({
        "folds": cfg.data.folds, "fold_seed": cfg.data.fold_seed, "dataset": cfg.data.dataset,
        "oof_checkpoint": cfg.cv.oof_checkpoint, "oof_tta": cfg.cv.oof_tta,
        "models": [{"fold": k, "checkpoint": checkpoints[k], "run_dir": runs[k]["run_dir"]} for k in sorted(runs)],
        "config_changes": cfg.changes(),
        "train_seconds": round(trained - started, 1),
        "oof_seconds": round(time.perf_counter() - trained, 1),
        "wall_seconds": round(time.perf_counter() - started, 1),
    })
    write_results(cv_dir, summary, scored)
    print("\n" + markdown(summary))
    r = summary["referral"]
    print(f"\ncut-points (cv.cut_rule={cfg.cv.cut_rule}, all out-of-fold scores): {summary['cut_points']}; "
          f"referral threshold {r['threshold']} for sensitivity >= {r['target_sensitivity']}")
    print(f"wrote {storage.join(cv_dir, CV_FILE)}; predict with the fold ensemble: python jobs/predict.py "
          f"--predict.checkpoint={cv_dir} --predict.images=...")
    return summary
