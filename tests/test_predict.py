"""Predict (Ray Data actor pool), the evaluation report and ONNX export.

One tiny run is trained once for the module (timm's test_efficientnet on 32 px APTOS images);
every test predicts with its best checkpoint. Ray tests share the session's Ray instance.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import helpers
from helpers import aptos_subset
from sklearn.metrics import accuracy_score, cohen_kappa_score, recall_score

from aptos_ray.config import ConfigError, SyntheticConfig, parse_args
from aptos_ray.data.format import decode_batch, read_split
from aptos_ray.train.checkpoint import read_checkpoint, resolve_checkpoint
from aptos_ray.infer.grader import TTA_VIEWS, Grader
from aptos_ray.infer.inputs import find_inputs
from aptos_ray.infer.predict import predict
from aptos_ray.infer.report import (
    bootstrap_qwk,
    compute_metrics,
    qwk_from_confusions,
    wilson_interval,
)
from aptos_ray.metrics import apply_cut_points, grading_metrics
from aptos_ray.train.driver import train

REPO = Path(__file__).resolve().parents[1]
# lr 0.01 for 2 epochs: a poor model, but one that predicts several grades (lower rates give
# one constant grade, which would make the metric checks below trivially true)
TINY = [*helpers.TINY, "--optim.lr=0.01", "--train.epochs=2"]


@pytest.fixture(scope="module")
def dataset(aptos_dir, tmp_path_factory) -> Path:
    return aptos_subset(aptos_dir, tmp_path_factory.mktemp("aptos") / "prepared", per_grade=16, size=32)


@pytest.fixture(scope="module")
def run(dataset, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("runs")
    return train(parse_args([*TINY, "--local", f"--data.dataset={dataset}", f"--train.output={out}", "--train.name=tiny"]))


@pytest.fixture(scope="module")
def checkpoint_state(run) -> dict:
    return torch.load(Path(run["best_checkpoint"]) / "model.pt", weights_only=True)


@pytest.fixture(scope="module")
def val_output(run, dataset, ray_session, tmp_path_factory) -> Path:
    """The val split predicted through Ray Data, with the run directory as the checkpoint."""
    out = tmp_path_factory.mktemp("predict-val")
    predict(parse_args([f"--predict.checkpoint={run['run_dir']}", f"--predict.images={dataset}",
                        "--predict.split=val", f"--predict.output={out}", "--predict.batch_size=8"]))
    return out


@pytest.fixture(scope="module")
def raw_layout(aptos_dir, tmp_path_factory) -> tuple[Path, list[str], dict[str, str]]:
    """A Kaggle-style folder (test.csv + test_images/) from shared APTOS images plus broken inputs."""
    root = tmp_path_factory.mktemp("raw") / "kaggle"
    images = root / "test_images"
    images.mkdir(parents=True)
    labels = pd.read_csv(aptos_dir / "labels.csv").groupby("diagnosis").head(2).head(8)
    for id_ in labels["id_code"]:
        shutil.copy(aptos_dir / "images" / f"{id_}.png", images / f"{id_}.png")
    (images / "zero_byte.png").write_bytes(b"")
    (images / "text_file.png").write_text("this is not a photograph\n")
    good = labels["id_code"].tolist()
    ids = good[:4] + ["zero_byte", "text_file", "not_there"] + good[4:] + [good[0]]  # last: a duplicate row
    pd.DataFrame({"id_code": ids}).to_csv(root / "test.csv", index=False)
    broken = {"zero_byte": "zero-byte", "text_file": "not an image", "not_there": "missing file", good[0]: "duplicate id"}
    return root, good, broken


def labelled_metrics(frame: pd.DataFrame) -> dict:
    return grading_metrics(frame["grade"], frame["predicted"])


# --------------------------------------------------------------------------- no Ray


def test_checkpoint_resolves_from_run_dir_checkpoint_dir_and_file(run, tmp_path):
    best = Path(run["best_checkpoint"]) / "model.pt"
    assert resolve_checkpoint(run["run_dir"]) == str(best)
    assert resolve_checkpoint(run["best_checkpoint"]) == str(best)
    assert resolve_checkpoint(str(best)) == str(best)
    with pytest.raises(FileNotFoundError, match="not found"):
        resolve_checkpoint(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="summary.json"):
        resolve_checkpoint(str(tmp_path))
    with pytest.raises(ConfigError, match="predict.checkpoint"):
        resolve_checkpoint("")


def test_input_layouts_are_recognised_and_problems_named(dataset, raw_layout, tmp_path):
    root, good, broken = raw_layout
    assert find_inputs(str(dataset), "val").kind == "prepared"
    raw = find_inputs(str(root), "test")
    # files that exist are decoded later, in Ray tasks; what the driver can tell already is reported here
    assert raw.kind == "csv" and [i["id"] for i in raw.items] == good[:4] + ["zero_byte", "text_file"] + good[4:]
    assert {u["id"]: u["reason"] for u in raw.unreadable} == {"not_there": "missing file", good[0]: "duplicate id: first on line 2"}
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no images"):
        find_inputs(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError):
        find_inputs(str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="split"):
        find_inputs(str(dataset), "holdout")


def test_qwk_from_confusions_and_bootstrap_agree_with_sklearn():
    rng = np.random.default_rng(1)
    y_true = rng.integers(0, 5, 300)
    y_pred = np.clip(y_true + rng.integers(-1, 2, 300), 0, 4)
    confusion = np.zeros((1, 5, 5), dtype=np.int64)
    np.add.at(confusion[0], (y_true, y_pred), 1)
    expected = cohen_kappa_score(y_true, y_pred, weights="quadratic")
    assert qwk_from_confusions(confusion)[0] == pytest.approx(expected, abs=1e-12)
    lo, hi = bootstrap_qwk(y_true, y_pred, resamples=1000, seed=0)
    assert lo < expected < hi and hi - lo < 0.2
    assert bootstrap_qwk(y_true, y_pred, 1000, seed=0) == (lo, hi)  # seeded: reproducible
    lo_small, hi_small = bootstrap_qwk(y_true[:40], y_pred[:40], 1000, seed=0)
    assert hi_small - lo_small > hi - lo  # fewer images, wider interval
    assert bootstrap_qwk(np.zeros(10, int), np.zeros(10, int)) == (0.0, 0.0)  # undefined -> 0, not NaN
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0


def test_tta_averages_the_probabilities_of_flipped_views(run, dataset):
    checkpoint = read_checkpoint(run["run_dir"])
    images = decode_batch(read_split(str(dataset), "val").slice(0, 6).to_pydict())
    plain, tta = Grader(checkpoint, tta=0), Grader(checkpoint, tta=2)
    x = plain.transforms.eval(images)
    with torch.no_grad():
        views = [plain.model(v).softmax(1) for v in (x, x.flip(3), x.flip(2))]
    expected = torch.stack(views).mean(0)
    got = tta(images)
    np.testing.assert_allclose(np.stack([got[f"prob_{g}"] for g in range(5)], 1), expected.numpy(), atol=1e-5)
    np.testing.assert_array_equal(got["predicted"], expected.argmax(1).numpy())
    assert np.allclose(got["p_referable"], expected[:, 2:].sum(1).numpy(), atol=1e-5)
    with pytest.raises(ConfigError, match="'predict.tta': input should be less than or equal to 7"):
        parse_args([f"--predict.tta={len(TTA_VIEWS) + 1}"], sections=["predict"])  # checked once, there


def test_regression_head_applies_the_saved_cut_points(dataset, tmp_path):
    run = train(parse_args([*TINY, "--local", f"--data.dataset={dataset}", f"--train.output={tmp_path}",
                            "--train.name=reg", "--train.epochs=1", "--model.head=regression"]))
    checkpoint = read_checkpoint(run["run_dir"])
    assert len(checkpoint.cut_points) == 4
    table = read_split(str(dataset), "val")
    graded = Grader(checkpoint)(decode_batch(table.to_pydict()))
    assert "prob_0" not in graded and "p_referable" not in graded  # no probabilities from a regression head
    np.testing.assert_array_equal(graded["predicted"], apply_cut_points(graded["score"], checkpoint.cut_points))
    grades = table.column("grade").to_numpy()
    assert grading_metrics(grades, graded["predicted"])["confusion"] == checkpoint.metrics["val_confusion"]
    frame = pd.DataFrame({"id": table.column("id").to_pylist(), "grade": grades, **graded})
    assert compute_metrics(frame, resamples=100)["referable"]["score"] == "continuous grade score"


def test_onnx_export_matches_pytorch_and_describes_preprocessing(run, dataset, checkpoint_state, tmp_path):
    import onnxruntime as ort

    from aptos_ray.infer.export import TOLERANCE, export

    meta = export(parse_args([f"--predict.checkpoint={run['run_dir']}", f"--predict.output={tmp_path}"]))
    saved = json.loads((tmp_path / "model.json").read_text())
    assert saved == json.loads(json.dumps(meta))
    assert saved["parity"]["max_abs_diff"] <= TOLERANCE and saved["parity"]["grades_equal"]
    assert saved["head"] == "classification" and saved["cut_points"] == checkpoint_state["cut_points"]
    pre = saved["preprocessing"]
    assert pre["size"] == 32 and len(pre["mean"]) == 3 and len(pre["std"]) == 3
    # a deployment with only model.onnx + model.json reproduces the in-training validation grades
    table = read_split(str(dataset), "val")
    images = decode_batch(table.to_pydict()).astype(np.float32) / 255.0  # already 32 px
    x = ((images - np.array(pre["mean"], np.float32)) / np.array(pre["std"], np.float32)).transpose(0, 3, 1, 2)
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    logits = session.run(None, {saved["input"]["name"]: np.ascontiguousarray(x)})[0]
    grades = table.column("grade").to_numpy()
    assert grading_metrics(grades, logits.argmax(1))["qwk"] == pytest.approx(checkpoint_state["metrics"]["val_qwk"], abs=1e-9)


# --------------------------------------------------------------------------- Ray Data actor pool


@pytest.mark.ray
def test_val_predictions_reproduce_the_in_training_validation(val_output, dataset, checkpoint_state):
    predictions = pd.read_parquet(val_output / "predictions.parquet")
    val = read_split(str(dataset), "val", ["id", "grade"]).to_pandas()
    assert sorted(predictions["id"]) == sorted(val["id"])  # every row once
    assert dict(zip(predictions["id"], predictions["grade"])) == dict(zip(val["id"], val["grade"].astype(int)))
    ours, training = labelled_metrics(predictions), checkpoint_state["metrics"]
    assert ours["confusion"] == training["val_confusion"]
    assert ours["qwk"] == pytest.approx(training["val_qwk"], abs=1e-12)
    assert ours["acc"] == pytest.approx(training["val_acc"], abs=1e-12)
    assert predictions["predicted"].nunique() > 1  # the checks above are not about a constant model
    probs = predictions[[f"prob_{g}" for g in range(5)]].to_numpy()
    assert np.allclose(probs.sum(1), 1, atol=1e-5)
    assert np.allclose(predictions["score"], probs @ np.arange(5), atol=1e-5)  # expected grade
    summary = json.loads((val_output / "predict.json").read_text())
    assert summary["num_inputs"] == summary["num_predicted"] == len(val) and summary["num_unreadable"] == 0
    assert summary["epoch"] == checkpoint_state["epoch"]


@pytest.mark.ray
def test_submission_is_in_kaggle_format(val_output):
    submission = pd.read_csv(val_output / "submission.csv", dtype={"id_code": str})
    predictions = pd.read_parquet(val_output / "predictions.parquet")
    assert list(submission.columns) == ["id_code", "diagnosis"]
    assert submission["id_code"].is_unique
    assert submission["id_code"].tolist() == predictions["id"].tolist()
    assert submission["diagnosis"].tolist() == predictions["predicted"].tolist()
    assert submission["diagnosis"].between(0, 4).all() and submission["diagnosis"].dtype.kind == "i"
    assert pd.read_csv(val_output / "unreadable.csv").empty
    assert not list(val_output.glob("_staging*")), "the workers' rows are removed once read"


@pytest.mark.ray
def test_report_holds_the_numbers_it_should(val_output):
    predictions = pd.read_parquet(val_output / "predictions.parquet")
    metrics = json.loads((val_output / "metrics.json").read_text())
    y, p = predictions["grade"], predictions["predicted"]
    assert metrics["n"] == len(predictions)
    assert metrics["qwk"] == pytest.approx(cohen_kappa_score(y, p, weights="quadratic"), abs=1e-12)
    lo, hi = metrics["qwk_ci95"]
    assert lo <= metrics["qwk"] <= hi and metrics["bootstrap"]["resamples"] == 1000
    assert metrics["accuracy"] == pytest.approx(accuracy_score(y, p))
    assert metrics["cohen_kappa"] == pytest.approx(cohen_kappa_score(y, p))
    recall = recall_score(y, p, labels=range(5), average=None, zero_division=0)
    assert [g["recall"] for g in metrics["per_grade"]] == pytest.approx(list(recall))
    ref = metrics["referable"]
    assert ref["tp"] == int(((y >= 2) & (p >= 2)).sum()) and ref["positives"] == int((y >= 2).sum())
    assert ref["sensitivity"] == pytest.approx(ref["tp"] / ref["positives"])
    assert 0 <= ref["auc"] <= 1 and ref["score"] == "P(grade >= 2)"
    html = (val_output / "report.html").read_text()
    sheet = (val_output / "quality_flagged.png").is_file()  # 32 px test images: all "too small"
    assert html.count("data:image/png;base64,") == 3 + sheet  # figures embedded: the file stands alone
    assert 'src="data:' in html and ".png\"" not in html
    assert f"{metrics['qwk']:.3f}" in html and "0.719" in html and "0.547" in html  # seed baseline for context
    md = (val_output / "report.md").read_text()
    assert "Referable" in md and f"{metrics['qwk']:.3f}" in md
    for name in ("confusion_matrix.png", "roc_referable.png", "grade_distribution.png"):
        assert (val_output / name).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.ray
def test_evaluate_job_rewrites_the_same_report(val_output, tmp_path):
    out = tmp_path / "eval"
    shutil.copytree(val_output, out)
    (out / "metrics.json").unlink()
    result = subprocess.run([sys.executable, str(REPO / "jobs" / "evaluate.py"), f"--predict.output={out}"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "QWK" in result.stdout
    fresh, first = (json.loads((d / "metrics.json").read_text()) for d in (out, val_output))
    assert {k: v for k, v in fresh.items() if k != "created"} == {k: v for k, v in first.items() if k != "created"}
    missing = subprocess.run([sys.executable, str(REPO / "jobs" / "evaluate.py"), f"--predict.output={tmp_path / 'no'}"],
                             capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and "predictions.parquet" in missing.stderr and "Traceback" not in missing.stderr


@pytest.mark.ray
def test_broken_raw_images_are_reported_by_id(run, raw_layout, ray_session, tmp_path, capsys):
    root, good, broken = raw_layout
    (tmp_path / "report.html").write_text("an earlier run's report")  # must not pass for this run's
    summary = predict(parse_args([f"--predict.checkpoint={run['best_checkpoint']}", f"--predict.images={root}",
                                  f"--predict.output={tmp_path}", "--predict.batch_size=4", "--predict.tta=1"]))
    printed = capsys.readouterr().out
    unreadable = pd.read_csv(tmp_path / "unreadable.csv", dtype=str)
    reasons = {}
    for row in unreadable.itertuples():
        reasons.setdefault(row.id, row.reason)
    assert set(reasons) == set(broken)
    for id_, fragment in broken.items():
        assert fragment in reasons[id_]
        assert id_ in printed
    predictions = pd.read_parquet(tmp_path / "predictions.parquet")
    assert predictions["id"].tolist() == good  # input (CSV) order
    assert (predictions["grade"] == -1).all()  # test.csv has no labels
    assert summary["num_inputs"] == len(good) + len(broken) == summary["num_predicted"] + summary["num_unreadable"]
    assert pd.read_csv(tmp_path / "submission.csv", dtype=str)["id_code"].tolist() == good
    assert not (tmp_path / "report.html").exists()  # nothing to evaluate without labels


@pytest.mark.ray
def test_a_uri_output_gets_its_predictions_as_parts_written_by_the_workers(run, raw_layout, aptos_dir, s3,
                                                                            ray_session, tmp_path):
    """To a bucket, predictions.parquet is a folder of parts the Ray workers wrote (the driver, which
    wrote one file before, gathers none of its rows), published whole: the same rows, columns and
    types as a local output's one file, the same submission.csv (input order) and unreadable.csv;
    evaluate reads the parts back and finds predict's own report."""
    from aptos_ray import storage
    from aptos_ray.infer.outputs import read_predictions
    from aptos_ray.infer.report import evaluate

    root, good, broken = raw_layout
    labelled = tmp_path / "kaggle"  # labelled, for the report
    shutil.copytree(root, labelled)
    grades = pd.read_csv(aptos_dir / "labels.csv").set_index("id_code")["diagnosis"]
    ids = pd.read_csv(labelled / "test.csv")["id_code"]
    pd.DataFrame({"id_code": ids, "diagnosis": [int(grades.get(i, 0)) for i in ids]}).to_csv(labelled / "test.csv", index=False)
    bucket = s3.bucket()
    uri = f"{bucket}/pred"
    with s3.fs.open_output_stream(f"{uri.removeprefix('s3://')}/predictions.parquet") as f:
        f.write(b"an older run's single file")  # replaced by the parts, not left beside them
    outputs = {"local": str(tmp_path / "local"), "uri": uri}
    for output in outputs.values():
        predict(parse_args([f"--predict.checkpoint={run['best_checkpoint']}", f"--predict.images={labelled}",
                            f"--predict.output={output}", "--predict.batch_size=4"]))
    local = pd.read_parquet(tmp_path / "local" / "predictions.parquet")
    keys = s3.keys(uri)
    parts = [k for k in keys if k.startswith("predictions.parquet/")]
    assert parts and "predictions.parquet" not in keys  # Ray Data's parts, no file (nor the older one)
    assert len(parts) == 1  # rows gathered into parts of PART_ROWS, not a file per batch of 4
    assert not [k for k in keys if "_staging" in k or ".tmp-" in k]  # staging and the unpublished folder are gone
    fs, inner = storage.filesystem(f"{uri}/predictions.parquet")
    on_s3 = pd.read_parquet(inner, filesystem=fs)
    assert list(on_s3.columns) == list(local.columns) and dict(on_s3.dtypes) == dict(local.dtypes)
    key = ["id"]
    pd.testing.assert_frame_equal(on_s3.sort_values(key).reset_index(drop=True), local.sort_values(key).reset_index(drop=True))
    assert local["id"].tolist() == good  # the local file in input order, as before
    for name in ("submission.csv", "unreadable.csv"):
        assert storage.read_text(f"{uri}/{name}") == (tmp_path / "local" / name).read_text()
    summaries = [json.loads(storage.read_text(storage.join(o, "predict.json"))) for o in outputs.values()]
    for field in ("num_inputs", "num_predicted", "num_unreadable", "predicted_grade_counts", "num_gradable"):
        assert summaries[0][field] == summaries[1][field]
    assert summaries[1]["num_unreadable"] == len(broken)
    pd.testing.assert_frame_equal(read_predictions(uri), on_s3.sort_values("id", kind="stable").reset_index(drop=True))
    reported = json.loads(storage.read_text(f"{uri}/metrics.json"))
    assert reported["n"] == len(good) and reported["qwk"] == json.loads((tmp_path / "local" / "metrics.json").read_text())["qwk"]
    again = json.loads(json.dumps(evaluate(parse_args([f"--predict.output={uri}"]))))
    assert {**again, "created": None} == {**reported, "created": None}  # the parts read back give the same report


@pytest.mark.ray
def test_synthetic_default_predicted_end_to_end_as_raw_layout(run, ray_session, tmp_path):
    from aptos_ray.data.synthetic import generate

    raw = generate(SyntheticConfig(output=str(tmp_path / "synthetic"), num_images=10, image_size=64, seed=3))
    (raw / "train_images" / "notes.txt").write_text("not an image")  # unlisted in train.csv: not an input
    out = tmp_path / "pred"
    summary = predict(parse_args([f"--predict.checkpoint={run['run_dir']}", f"--predict.images={raw}",
                                  f"--predict.output={out}", "--predict.num_actors=1"]))
    labels = pd.read_csv(raw / "train.csv", dtype={"id_code": str})
    predictions = pd.read_parquet(out / "predictions.parquet")
    assert predictions["id"].tolist() == labels["id_code"].tolist()
    assert predictions["grade"].tolist() == labels["diagnosis"].tolist()
    assert summary["num_unreadable"] == 0 and summary["num_labelled"] == 10
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n"] == 10 and (out / "report.html").is_file()


@pytest.mark.ray
def test_image_folder_without_labels(run, raw_layout, ray_session, tmp_path):
    root, good, _ = raw_layout
    folder = tmp_path / "photos"
    folder.mkdir()
    for id_ in good[:3]:
        shutil.copy(root / "test_images" / f"{id_}.png", folder / f"{id_}.png")
    (folder / "README.txt").write_text("three photographs")
    summary = predict(parse_args([f"--predict.checkpoint={run['run_dir']}", f"--predict.images={folder}",
                                  f"--predict.output={tmp_path / 'out'}", "--predict.num_actors=1"]))
    assert summary["num_inputs"] == 4 and summary["num_predicted"] == 3
    unreadable = pd.read_csv(tmp_path / "out" / "unreadable.csv")
    assert unreadable["id"].tolist() == ["README"] and "not an image file" in unreadable["reason"][0]


def test_compute_metrics_needs_labels():
    frame = pd.DataFrame({"id": ["a"], "grade": [-1], "predicted": [0], "score": [0.1]})
    with pytest.raises(ConfigError, match="labelled"):
        compute_metrics(frame)


@pytest.mark.ray
def test_quality_verdicts_and_explanations_end_to_end(run, aptos_dir, ray_session, tmp_path):
    """Real photographs and known degradations of them: verdicts in predictions.parquet (same pass),
    the Kaggle submission unchanged, Grad-CAM overlays written and the report showing both."""
    from PIL import Image

    from benchmarks.degradations import degrade

    root = tmp_path / "raw"
    (root / "test_images").mkdir(parents=True)
    labels = pd.read_csv(aptos_dir / "labels.csv").groupby("diagnosis").head(1)
    rows = []
    for r in labels.itertuples():
        shutil.copy(aptos_dir / "images" / f"{r.id_code}.png", root / "test_images" / f"{r.id_code}.png")
        rows.append((r.id_code, r.diagnosis))
    photo = np.asarray(Image.open(aptos_dir / "images" / f"{rows[0][0]}.png").convert("RGB"))
    expected = {"blurred": ("blur", "out of focus"), "dim": ("dark", "too dark"), "half": ("crop_half", "fundus cut off")}
    for name, (kind, _) in expected.items():
        Image.fromarray(degrade(photo, kind)).save(root / "test_images" / f"{name}.png")
        rows.append((name, rows[0][1]))
    pd.DataFrame(rows, columns=["id_code", "diagnosis"]).to_csv(root / "test.csv", index=False)
    out = tmp_path / "out"
    summary = predict(parse_args([f"--predict.checkpoint={run['run_dir']}", f"--predict.images={root}",
                                  f"--predict.output={out}", "--predict.num_actors=1", "--predict.explain=2"]))
    predictions = pd.read_parquet(out / "predictions.parquet").set_index("id")
    reasons = predictions["quality_reason"].to_dict()
    assert all(predictions.loc[r[0], "gradable"] for r in rows[:5]), reasons  # the shared photographs pass
    assert {name: reasons[name] for name in expected} == {name: reason for name, (_, reason) in expected.items()}
    assert not predictions.loc[list(expected), "gradable"].any()
    assert summary["num_gradable"] == 5 and summary["ungradable_reasons"] == {r: 1 for _, r in expected.values()}
    assert list(pd.read_csv(out / "submission.csv").columns) == ["id_code", "diagnosis"]
    index = pd.read_csv(out / "explain" / "index.csv", dtype={"id": str})
    assert set(index["group"]) <= {"confident_referable", "uncertain", "miss"} and len(index) == summary["explain"]["images"]
    assert (index.groupby("group").size() <= 2).all() and (index["group"] == "uncertain").sum() == 2
    assert summary["explain"]["same_grade_as_prediction"] == 1.0  # the explained model is the one that predicted
    for f in index["file"]:
        assert Image.open(out / f).size == (256, 256)  # the image as preprocessed for prediction
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["quality"]["num_ungradable"] == 3 and metrics["quality"]["gradable_metrics"]["n"] == 5
    html = (out / "report.html").read_text()
    assert "Image quality" in html and "gradable only" in html and "Where the model looked" in html
    assert html.count("data:image/png;base64,") == 3 + 1 + len(index)  # figures, contact sheet, overlays
    md = (out / "report.md").read_text()
    assert "| blurred | out of focus |" in md and "](explain/" in md and "quality_flagged.png" in md


class _RecordingDataset:
    """A Ray dataset whose write_parquet calls are noted (path and options) before they run."""

    def __init__(self, ds):
        self.ds, self.writes = ds, []

    def write_parquet(self, path, **options):
        self.writes.append((path, options))
        return self.ds.write_parquet(path, **options)

    def iter_batches(self, **options):
        return self.ds.iter_batches(**options)


@pytest.mark.ray
def test_prediction_rows_for_a_local_output_reach_the_driver_not_the_workers_disks(tmp_path, ray_session):
    """On a multi-node cluster a write task to a local path writes to its own node's disk, and the
    driver would read back only its own part ("predict lost rows"): for a local output the rows
    stream to the driver instead; no worker writes anything."""
    import ray

    from aptos_ray.infer.predict import collect

    rows = [{"id": f"img-{i}", "predicted": i % 5, "height": 32} for i in range(40)]
    ds = _RecordingDataset(ray.data.from_items(rows, override_num_blocks=4))
    got = collect(ds, str(tmp_path / "out"))
    assert sorted(got["id"]) == sorted(f"img-{i}" for i in range(40)) and "height" not in got
    assert ds.writes == []  # nothing staged by the workers
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_ensemble_members_given_as_relative_paths_reach_the_actors_resolved(tmp_path, monkeypatch):
    """predict.checkpoint=a/model.pt,b/model.pt is read on the driver; the actors, in their own working
    directory, must get the members as the driver found them."""
    from aptos_ray.infer.ensemble import read_ensemble

    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.pt").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    spec = read_ensemble("a/model.pt, b").spec  # what checkpoint_for_driver hands to the actors
    monkeypatch.chdir("/")  # an actor's working directory
    assert read_ensemble(spec).members == [str(tmp_path / "a" / "model.pt"), str(tmp_path / "b" / "model.pt")]


def test_predict_asks_for_gpu_actors_an_autoscaler_can_add(monkeypatch):
    """--scaling.use_gpu=true on a cluster with no GPU node up yet: the pool is sized from what is
    asked (predict.num_actors), up to what the autoscaler's GPU node type can hold; an actor no
    node type can hold is refused before any work."""
    import ray

    from aptos_ray import ray_setup
    from aptos_ray.infer.predict import actor_resources
    from aptos_ray.ray_internals import NodeType

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4.0})  # the CPU head only, for now
    monkeypatch.setattr(ray_setup, "autoscaler_node_types", lambda: [
        NodeType("head", {"CPU": 4}, 1), NodeType("gpu", {"CPU": 8, "GPU": 1}, 3)])
    gpu = parse_args(["--scaling.use_gpu=true"]).scaling
    assert actor_resources(2, gpu) == (2, {"num_gpus": 1.0, "num_cpus": 1})
    assert actor_resources(8, gpu) == (3, {"num_gpus": 1.0, "num_cpus": 1})  # 3 nodes of 1 GPU
    assert actor_resources(2, parse_args([]).scaling)[1] == {"num_cpus": 1.0}  # CPU actors unless asked
    # (more than one GPU per actor is refused where the config is parsed: an actor uses one)
    monkeypatch.setattr(ray_setup, "autoscaler_node_types", lambda: [NodeType("head", {"CPU": 4}, 1)])
    with pytest.raises(ConfigError, match=r"predict with --scaling.use_gpu=true: the Ray cluster cannot fit one "
                                          r"actor: one worker asks for 1 CPU \+ 1 GPU and no node"):
        actor_resources(2, gpu)
