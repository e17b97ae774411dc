"""K-fold cross-validation (issue 18): folds, repeatable CPU training, out-of-fold cut-points and the
referral point, the fold ensemble at predict time. Small: 40 APTOS images at 32 px, 2-step epochs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import helpers
import numpy as np
import pandas as pd
import pytest
import torch
from helpers import aptos_subset

from aptos_ray.config import parse_args
from aptos_ray.cut_rules import choose_cut_points
from aptos_ray.data.folds import assign_folds, fold_table, training_tables
from aptos_ray.data.format import decode_batch, read_manifest, table_batches
from aptos_ray.errors import ConfigError, ExistingFileError, MissingFileError
from aptos_ray.train.checkpoint import read_checkpoint
from aptos_ray.infer.ensemble import EnsembleGrader, build_grader, read_ensemble
from aptos_ray.metrics import optimise_cut_points, quadratic_weighted_kappa, referral_rates, referral_threshold
from aptos_ray.train.driver import train
from aptos_ray.train.loop import DatasetInfo, LocalBackend
from aptos_ray.tune.cv import run_cv
from aptos_ray.tune.cv_results import cross_fitted, decisions

TINY = [*helpers.TINY, "--model.head=regression", "--optim.lr=0.003", "--train.tracking=none",
        "--train.max_steps_per_epoch=2", "--train.threads=1", "--local"]


@pytest.fixture(scope="module")
def tiny_aptos(aptos_dir, tmp_path_factory) -> Path:
    return aptos_subset(aptos_dir, tmp_path_factory.mktemp("cv") / "prepared", per_grade=8, size=32)


# --- folds -----------------------------------------------------------------------------------------


def test_folds_are_stratified_grouped_complete_and_seeded():
    rng = np.random.default_rng(0)
    grades = rng.choice(5, size=300, p=[0.5, 0.1, 0.25, 0.05, 0.1])
    groups = np.full(300, -1)
    for g, start in enumerate(range(0, 60, 3)):  # 20 near-duplicate triples
        groups[start:start + 3] = g
        grades[start:start + 3] = grades[start]
    folds = assign_folds(grades, groups, 5, seed=0)
    assert set(folds) == {0, 1, 2, 3, 4} and len(folds) == 300  # every row in exactly one fold
    for g in range(20):
        assert len(set(folds[groups == g])) == 1  # a group never straddles folds
    for grade in range(5):  # stratified: each fold holds about a fifth of every grade
        per_fold = np.bincount(folds[grades == grade], minlength=5)
        assert per_fold.max() - per_fold.min() <= 3, (grade, per_fold)
    assert np.array_equal(folds, assign_folds(grades, groups, 5, seed=0))
    assert not np.array_equal(folds, assign_folds(grades, groups, 5, seed=1))


def test_fold_tables_pool_the_splits_and_validate_each_image_once(tiny_aptos):
    cfg = parse_args([f"--data.dataset={tiny_aptos}", "--data.folds=3"])
    table = fold_table(str(tiny_aptos), 3, 0).to_pandas()
    manifest = read_manifest(str(tiny_aptos))
    assert len(table) == sum(sum(c.values()) for c in manifest["counts"].values())
    seen = []
    for fold in range(3):
        cfg.data.fold = fold
        train_rows, val_rows = training_tables(cfg.data)
        train_ids, val_ids = set(train_rows.column("id").to_pylist()), set(val_rows.column("id").to_pylist())
        assert not train_ids & val_ids and train_ids | val_ids == set(table["id"])
        info = DatasetInfo.for_data(cfg.data, manifest)
        assert info.num_val == len(val_ids) and info.num_train == len(train_ids)
        seen += sorted(val_ids)
    assert sorted(seen) == sorted(table["id"])
    with pytest.raises(ConfigError, match="data.fold must be 0..2"):
        parse_args(["--data.folds=3", "--data.fold=3"])


# --- decisions on out-of-fold scores ---------------------------------------------------------------


def test_referral_threshold_is_the_most_specific_point_reaching_the_target():
    rng = np.random.default_rng(1)
    grades = rng.integers(0, 5, 500)
    scores = grades + rng.normal(0, 0.9, 500)
    for target in (0.8, 0.9, 0.95):
        t = referral_threshold(scores, grades, target)
        assert referral_rates(scores, grades, t)["sensitivity"] >= target
        higher = np.min(scores[(grades >= 2) & (scores > t)])  # the next referable score up
        assert referral_rates(scores, grades, higher)["sensitivity"] < target


def test_oof_cut_points_follow_a_biased_model_and_folds_are_scored_with_the_others_decisions():
    rng = np.random.default_rng(2)
    grades = rng.choice(5, 600, p=[0.45, 0.1, 0.25, 0.08, 0.12])
    oof = pd.DataFrame({"id": [str(i) for i in range(600)], "grade": grades, "fold": np.arange(600) % 2,
                        "score": grades + 0.45 + rng.normal(0, 0.35, 600)})  # over-grades by ~0.45
    fitted = decisions(oof["score"].to_numpy(), grades, 0.9)
    cuts = fitted["cut_points"]
    assert np.mean(cuts) - 2.0 > 0.25  # moved up with the bias (default cut-points average 2.0)
    default_qwk = quadratic_weighted_kappa(grades, np.digitize(oof["score"], [0.5, 1.5, 2.5, 3.5]))
    assert quadratic_weighted_kappa(grades, np.digitize(oof["score"], cuts)) > default_qwk
    assert fitted["referral"]["sensitivity"] >= 0.9 and fitted["referral"]["calibration"][0] > 0
    scored = cross_fitted(oof, 0.9)  # fold 0 graded with cut-points chosen on fold 1 alone
    mine = oof["fold"] == 0
    expected = np.digitize(oof.loc[mine, "score"], optimise_cut_points(oof.loc[~mine, "score"], grades[~mine]))
    assert np.array_equal(scored.loc[mine, "predicted"], expected)


# --- repeatability and the job end to end ----------------------------------------------------------


def test_two_local_runs_give_the_same_weights_and_figures(tiny_aptos, tmp_path):
    """Same seed, data and machine: identical validation figures and weights (augmentation, dropout
    and sampling all on), on a fold of the pooled rows."""
    states = []
    for name in ("a", "b"):
        summary = train(parse_args([*TINY, f"--data.dataset={tiny_aptos}", f"--train.output={tmp_path}",
                                    f"--train.name={name}", "--train.epochs=2", "--data.folds=2",
                                    "--data.fold=1"]))
        states.append(torch.load(Path(summary["last_checkpoint"]) / "model.pt", weights_only=True))
    a, b = states
    assert a["metrics"]["val_loss"] == b["metrics"]["val_loss"] and a["cut_points"] == b["cut_points"]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


@pytest.fixture(scope="module")
def cv_dir(tiny_aptos, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cv_runs")
    run_cv(parse_args([*TINY, f"--data.dataset={tiny_aptos}", "--data.folds=2", "--train.epochs=1",
                       f"--cv.output={out}", "--cv.name=tiny", "--cv.target_sensitivity=0.9"]))
    return out / "tiny"


def test_cv_job_predicts_every_image_once_and_saves_its_decisions(cv_dir, tiny_aptos):
    oof = pd.read_parquet(cv_dir / "oof.parquet")
    folds = pd.read_csv(cv_dir / "folds.csv")
    assert sorted(oof["id"]) == sorted(folds["id"].astype(str)) and oof["id"].is_unique
    summary = json.loads((cv_dir / "cv.json").read_text())
    assert [m["fold"] for m in summary["models"]] == [0, 1] and len(summary["per_fold"]) == 2
    assert len(summary["cut_points"]) == 4 and summary["referral"]["target_sensitivity"] == 0.9
    refer = oof["score"] >= summary["referral"]["threshold"]
    assert refer[oof["grade"] >= 2].mean() >= 0.9  # the deployed point reaches the target on OOF
    assert "| mean ± sd |" in (cv_dir / "cv.md").read_text()


def test_a_finished_cv_is_re_decided_by_another_cut_rule_without_training(cv_dir, tmp_path):
    shutil.copytree(cv_dir, tmp_path / "tiny")
    saved = tmp_path / "tiny" / "config.yaml"  # the copy's own place, or --resume sees another cv.output
    saved.write_text(saved.read_text().replace(str(cv_dir.parent), str(tmp_path)))
    before = json.loads((cv_dir / "cv.json").read_text())
    summary = run_cv(parse_args([*TINY, f"--data.dataset={before['dataset']}", "--data.folds=2", "--train.epochs=1",
                                 f"--cv.output={tmp_path}", "--cv.name=tiny", "--cv.target_sensitivity=0.9",
                                 "--cv.cut_rule=prior", "--resume"]))
    assert summary["cut_rule"] == "prior" == json.loads((tmp_path / "tiny" / "cv.json").read_text())["cut_rule"]
    assert summary["train_seconds"] < 5  # both folds kept: nothing trained again
    oof = pd.read_parquet(tmp_path / "tiny" / "oof.parquet")
    assert summary["cut_points"] == choose_cut_points(oof["score"], oof["grade"], "prior")


def test_ensemble_is_the_mean_of_its_members_with_the_oof_decisions(cv_dir, tiny_aptos):
    ensemble = read_ensemble(str(cv_dir))
    table = training_tables(parse_args([f"--data.dataset={tiny_aptos}"]).data)[1]
    images = decode_batch(next(table_batches(table, 16)), "raw")
    grader = build_grader(str(cv_dir), tta=1)
    assert isinstance(grader, EnsembleGrader)
    assert [g.cut_points for g in grader.graders] == [read_checkpoint(m).cut_points for m in ensemble.members]
    mean = torch.stack([member.outputs(images) for member in grader.graders]).mean(0)  # each with its TTA view
    assert torch.allclose(grader.outputs(images), mean, atol=1e-6)
    out = grader(images)
    assert np.array_equal(out["refer"] == 1, out["score"] >= ensemble.referral["threshold"])
    assert np.all((out["p_referable"] >= 0) & (out["p_referable"] <= 1))
    assert np.array_equal(out["predicted"], np.digitize(out["score"], ensemble.cut_points, right=True))
    listed = build_grader(",".join(ensemble.members))  # a plain list: no referral point, mean cut-points
    assert isinstance(listed, EnsembleGrader) and "refer" not in listed.output_columns
    assert listed.cut_points == pytest.approx(np.mean([sorted(g.cut_points) for g in grader.graders], axis=0),
                                              abs=1e-4)


def test_a_stopped_cv_resumes_its_unfinished_folds_only(tiny_aptos, tmp_path, monkeypatch):
    """Killed in fold 1 after its first epoch (fold 0 done): --resume keeps fold 0 as it is, continues
    fold 1 from its checkpoint, and ends with the out-of-fold scores of a run that was never stopped."""
    args = [*TINY, f"--data.dataset={tiny_aptos}", "--data.folds=2", "--train.epochs=2", f"--cv.output={tmp_path}"]
    run_cv(parse_args([*args, "--cv.name=whole"]))

    class Killed(BaseException):
        pass

    report = LocalBackend.report

    def dying_report(self, metrics, checkpoint_dir, epoch):
        report(self, metrics, checkpoint_dir, epoch)
        if str(self.run_dir).endswith("fold_1") and epoch == 0:
            raise Killed

    monkeypatch.setattr(LocalBackend, "report", dying_report)
    with pytest.raises(Killed):
        run_cv(parse_args([*args, "--cv.name=stopped"]))
    monkeypatch.undo()
    stopped = tmp_path / "stopped"
    fold_0 = (stopped / "fold_0" / "summary.json").stat().st_mtime_ns

    with pytest.raises(ExistingFileError, match="pass --resume"):
        run_cv(parse_args([*args, "--cv.name=stopped"]))
    with pytest.raises(ConfigError, match="train.epochs=3"):
        run_cv(parse_args([*args, "--cv.name=stopped", "--train.epochs=3", "--resume"]))
    with pytest.raises(MissingFileError, match="holds no cross-validation"):
        run_cv(parse_args([*args, "--cv.name=never", "--resume"]))
    run_cv(parse_args([*args, "--cv.name=stopped", "--resume"]))

    assert (stopped / "fold_0" / "summary.json").stat().st_mtime_ns == fold_0  # not trained again
    epochs = [json.loads(line)["epoch"] for line in (stopped / "fold_1" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [0, 1]
    oof = [pd.read_parquet(tmp_path / name / "oof.parquet").sort_values("id") for name in ("whole", "stopped")]
    assert np.array_equal(oof[0]["id"], oof[1]["id"]) and np.allclose(oof[0]["score"], oof[1]["score"], atol=1e-6)


@pytest.mark.ray
@pytest.mark.slow
def test_folds_train_on_the_cluster_as_tune_trials(tiny_aptos, tmp_path, ray_session):
    """Without --local each fold is a Tune trial running one TorchTrainer (``tune.trial``, as a search's
    trials are): every fold's run folder ends with its config, summary and best checkpoint of that fold."""
    from aptos_ray.tune.cv import train_folds_ray

    cfg = parse_args([*[a for a in TINY if a != "--local"], f"--data.dataset={tiny_aptos}", "--data.folds=2",
                      "--train.epochs=1", "--scaling.num_workers=1", "--cv.max_concurrent_folds=1"])
    runs = train_folds_ray(cfg, str(tmp_path), read_manifest(str(tiny_aptos)), {})
    assert sorted(runs) == [0, 1]
    for k, run in runs.items():
        assert run["run_dir"] == str(tmp_path / f"fold_{k}") and run["epochs"] == 1
        assert (tmp_path / f"fold_{k}" / "config.yaml").is_file()
        assert read_checkpoint(run["best_checkpoint"]).config.data.fold == k


@pytest.mark.ray
def test_out_of_fold_predictions_on_the_cluster_match_the_in_process_ones(cv_dir, tiny_aptos, ray_session):
    """Without --local the out-of-fold images are graded in the predict job's actor pool, not in the
    driver: the same ids, folds, grades and scores as the in-process predictions of the same models."""
    from aptos_ray.tune.cv import oof_predictions_ray

    summary = json.loads((cv_dir / "cv.json").read_text())
    checkpoints = {m["fold"]: m["checkpoint"] for m in summary["models"]}
    local = pd.read_parquet(cv_dir / "oof.parquet")
    cfg = parse_args([f"--data.dataset={tiny_aptos}", "--data.folds=2", "--predict.batch_size=16"])
    on_ray = oof_predictions_ray(cfg, checkpoints)
    assert list(on_ray["id"]) == list(local["id"])
    assert list(on_ray["fold"]) == list(local["fold"]) and list(on_ray["grade"]) == list(local["grade"])
    np.testing.assert_allclose(on_ray["score"], local["score"], atol=1e-5)


@pytest.mark.ray
@pytest.mark.parametrize("materialize, copies", [("true", 1), ("false", 0)])
def test_cross_validation_holds_its_rows_in_the_object_store_once(tiny_aptos, tmp_path, ray_session, monkeypatch,
                                                                  materialize, copies):
    """data.materialize decides whether the pooled rows are materialised, once; the folds' filters
    of them are not materialised again (K+1 copies before)."""
    import ray

    from aptos_ray.train.ray_backend import load_cv_datasets
    from aptos_ray.tune.cv import fold_config

    calls = []
    real = ray.data.Dataset.materialize
    monkeypatch.setattr(ray.data.Dataset, "materialize", lambda self: calls.append(1) or real(self))
    cfg = parse_args([f"--data.dataset={tiny_aptos}", "--data.folds=3", f"--data.materialize={materialize}"])
    datasets = load_cv_datasets(cfg, {k: fold_config(cfg, k, str(tmp_path)) for k in range(3)})
    assert len(calls) == copies
    assert sum(datasets[k]["val"].count() for k in range(3)) == len(fold_table(str(tiny_aptos), 3, 0))
