"""A search's results: one run record per trial, the trial table, the best config and the QWK plot."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.fs as pafs
from ray import tune as ray_tune
from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY

from aptos_ray import figures, storage
from aptos_ray.config import Config, config_from_dict
from aptos_ray.errors import SearchFailed
from aptos_ray.train.checkpoint import (
    CHECKPOINT_FILE,
    RunRecord,
    read_history,
    write_run_files,
)
from aptos_ray.tune.space import plain

METRIC = "val_qwk"




def saved_trials(exp_dir: str) -> dict[str, tuple[str, str]]:
    """Trial folder name -> (trial id, status), as saved for a resume. The status is TERMINATED or
    ERROR once a trial finished, PENDING or PAUSED when the search was interrupted (Ctrl+C) before
    it did; the statuses in memory after an interrupt say TERMINATED, hence the saved state. The
    folder name identifies also a trial that errored before its first report."""
    return {Path(t.path).name: (t.trial_id, t.status) for t in ray_tune.ExperimentAnalysis(exp_dir).trials}


def trial_record(result, run_dir: str) -> RunRecord:
    """A trial's run record, from what Tune received: the history inside the checkpoint of its last
    report (every epoch up to it, nothing after) and the checkpoints it reported that are kept.

    Tune's reports are the record because ASHA acted on them; a stopped trial's workers may still
    be finishing an epoch while they are torn down, and nothing of that is counted or rewritten.
    """
    df = result.metrics_dataframe
    if df is None or df.empty or CHECKPOINT_PATH_KEY not in df:
        return RunRecord(run_dir, [], {})
    reports = df.dropna(subset=[CHECKPOINT_PATH_KEY]).drop_duplicates("epoch", keep="last")
    paths = {int(r["epoch"]): storage.join(run_dir, Path(r[CHECKPOINT_PATH_KEY]).name)
             for r in reports.to_dict("records")}
    last = paths[int(reports.iloc[-1]["epoch"])]
    kept = {epoch: path for epoch, path in paths.items() if storage.exists(storage.join(path, CHECKPOINT_FILE))}
    return RunRecord(run_dir, read_history(last), kept)


def trials_table(results, runs_dir: str, max_epochs: int, trials: dict[str, tuple[str, str]]
                 ) -> tuple[pd.DataFrame, dict[str, RunRecord]]:
    """One row per trial (searched values, epochs, best QWK and epoch, seconds, status; best
    first) and every trial's run record."""
    rows, records = [], {}
    for result in results:
        trial_id, tune_status = trials[Path(result.path).name]
        run_dir = storage.join(runs_dir, trial_id)
        finished = tune_status in ("TERMINATED", "ERROR")
        record = records[trial_id] = trial_record(result, run_dir)
        best = record.best if record.history else {}
        if result.error:
            status = "error"
        elif not finished:
            status = "unfinished"  # its TorchTrainer resumes from its run directory
        else:
            status = "completed" if len(record.history) >= max_epochs else "stopped early"
        rows.append({
            "trial_id": trial_id,
            **{k: plain(v) for k, v in result.config.items()},
            "epochs": len(record.history),
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
    return table, records


def write_trial_runs(table: pd.DataFrame, records: dict[str, RunRecord]) -> None:
    """metrics.jsonl, plots and summary.json in every trial's run directory, as a train run has."""
    for row in table.to_dict("records"):
        if row["epochs"] > 0:
            write_run_files(records[row["trial_id"]], 0.0 if math.isnan(row["seconds"]) else row["seconds"])


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
        cfg.set_value(key, plain(best_row[key]))
    cfg.train.name = ""
    cfg.train.resume = False
    cfg.tune.resume = False
    return cfg


def qwk_curves_png(table: pd.DataFrame, records: dict[str, RunRecord], params: list[str]) -> bytes:
    curves = {}
    for row in table.to_dict("records"):  # records: dotted column names are no attribute names
        values = ", ".join(_short(k, row.get(k)) for k in params)
        curves[f"{row['trial_id']} {values}"] = [(h["epoch"], h[METRIC]) for h in records[row["trial_id"]].history]
    return figures.png(figures.qwk_curves(curves, title="Validation QWK per trial"))


def _short(key: str, value: Any) -> str:
    shown = f"{value:.3g}" if isinstance(value, float) else str(value)
    return f"{key.split('.')[-1]}={shown}"


def write_outputs(cfg: Config, table: pd.DataFrame, records: dict, exp_dir: str, params: list[str]) -> dict:
    paths = {name: storage.join(exp_dir, name) for name in
             ("trials.csv", "trials.md", "best_config.yaml", "qwk_per_epoch.png")}
    storage.write_text(paths["trials.csv"], table.to_csv(index=False))
    storage.write_text(paths["trials.md"], markdown(table))
    finished = table[table["epochs"] > 0]
    if finished.empty:
        raise SearchFailed(f"no trial finished an epoch; the first error:\n{first_error(exp_dir)}")
    storage.write_bytes(paths["qwk_per_epoch.png"], qwk_curves_png(table, records, params))
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


