"""Every input and output by URI, on a real S3 API (moto's server on localhost, tests/s3.py).

The raw-layout reader on S3 gives what it gives on disk, image bytes are read through the
filesystem of the record's URI, a local path only the driver has fails the job with one line,
and the whole pipeline (prepare -> train with a killed worker -> predict -> report) runs with
nothing but the bucket for storage.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time

import numpy as np
import pandas as pd
import pytest
import ray
from test_sources import BROKEN, DECODE_BROKEN, disc, save, write_broken_corpus

import helpers
import s3 as s3_server
from aptos_ray import storage
from aptos_ray.cli import run_job
from aptos_ray.config import PrepareConfig
from aptos_ray.data import prepare as prepare_module
from aptos_ray.data.preprocess import ImageError
from aptos_ray.data.sources import read_image, read_source, reason_kind, stop_on_driver_only_paths
from aptos_ray.errors import DataError, DriverOnlyPathError
from aptos_ray.infer.inputs import find_inputs
from aptos_ray.train import ray_backend


def layout_summary(src) -> tuple:
    """What must not depend on where the layout is stored: ids, grades, splits, quarantine reasons."""
    records = sorted((r["id"], r["grade"], r["split"]) for r in src.records)
    quarantined = sorted((q["id"], reason_kind(q["reason"])) for q in src.quarantined)
    return records, quarantined, src.info["layout"]


def read_both(s3, local, **kw):
    """The layout at ``local`` read from disk and, uploaded, from a fresh bucket."""
    uri = s3.upload(local, storage.join(s3.bucket(), "raw"))
    return read_source(PrepareConfig(input=str(local), **kw)), read_source(PrepareConfig(input=uri, **kw)), uri


# ---------------------------------------------------------------- the reader on S3, each layout


def test_kaggle_layout_with_broken_inputs_reads_the_same_from_s3(s3, tmp_path):
    on_disk, on_s3, uri = read_both(s3, write_broken_corpus(tmp_path / "raw"))
    assert layout_summary(on_s3) == layout_summary(on_disk)
    assert {q["id"]: reason_kind(q["reason"]) for q in on_s3.quarantined} == BROKEN
    assert on_s3.info["unlisted_images"] == 1
    for record in on_s3.records:  # bytes through the S3 filesystem, decoded as from disk
        assert record["source"].startswith(f"{uri}/train_images/") and "listed_on" not in record
        if record["id"] in DECODE_BROKEN:
            with pytest.raises(ImageError) as e:
                read_image(record, min_side=32)
            assert reason_kind(e.value.reason) == DECODE_BROKEN[record["id"]]
        else:
            local = next(r for r in on_disk.records if r["id"] == record["id"])
            assert np.array_equal(read_image(record, 32), read_image(local, 32))


def test_labels_csv_with_image_folder_option_from_s3(s3, tmp_path):
    (tmp_path / "pics").mkdir()
    for i in range(4):
        save(tmp_path / "pics" / f"p{i}.jpg", disc(i))
    (tmp_path / "meta").mkdir()
    (tmp_path / "meta" / "grades.csv").write_text("image,level,split\n" + "".join(
        f"p{i},{i},{'train' if i < 3 else 'test'}\n" for i in range(4)) + "p9,1,\n")
    bucket = s3.bucket()
    s3.upload(tmp_path / "pics", storage.join(bucket, "pics"))
    csv = s3.upload(tmp_path / "meta" / "grades.csv", storage.join(bucket, "meta", "grades.csv"))
    src = read_source(PrepareConfig(input=csv, images=storage.join(bucket, "pics")))
    local = read_source(PrepareConfig(input=str(tmp_path / "meta" / "grades.csv"), images=str(tmp_path / "pics")))
    assert layout_summary(src) == layout_summary(local)
    assert [q["id"] for q in src.quarantined] == ["p9"] and src.records[3]["split"] == "test"
    with pytest.raises(DataError, match="image folder not found"):
        read_source(PrepareConfig(input=csv, images=storage.join(bucket, "elsewhere")))


def test_class_folders_below_split_folders_from_s3(s3, tmp_path):
    for split, grade, k in [("train", 0, 0), ("train", 0, 1), ("train", 4, 0), ("val", 4, 1), ("test", 0, 2)]:
        (tmp_path / split / str(grade)).mkdir(parents=True, exist_ok=True)
        save(tmp_path / split / str(grade) / f"{split}{grade}{k}.png", disc(grade, seed=k))
    (tmp_path / "train" / "0" / "notes.txt").write_text("not an image")
    (tmp_path / "train" / "0" / "prepared").mkdir()  # a dataset prepare wrote into a class folder: skipped
    (tmp_path / "train" / "0" / "prepared" / "manifest.json").write_text("{}")
    on_disk, on_s3, _ = read_both(s3, tmp_path)
    assert layout_summary(on_s3) == layout_summary(on_disk)
    assert sorted(r["split"] for r in on_s3.records) == ["test", "train", "train", "train", "val"]
    assert [reason_kind(q["reason"]) for q in on_s3.quarantined] == ["unsupported file type"]
    assert len(on_s3.info["skipped_own_outputs"]) == 1


def test_npz_from_s3(s3, tmp_path):
    images = np.stack([disc(i % 5, 28, seed=i) for i in range(6)])
    np.savez(tmp_path / "mini.npz", train_images=images, train_labels=np.arange(6) % 5)
    on_disk, on_s3, uri = read_both(s3, tmp_path)
    assert layout_summary(on_s3) == layout_summary(on_disk) and on_s3.info["npz"] == f"{uri}/mini.npz"
    assert np.array_equal(read_image(on_s3.records[2], 32), read_image(on_disk.records[2], 32))


def test_predict_lists_raw_layouts_on_s3(s3, tmp_path):
    """predict's inputs come from the same reader: a folder of images, a CSV without labels, class folders."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):
        save(folder / f"eye{i}.png", disc(i))
    (folder / "README.txt").write_text("three photographs")
    uri = s3.upload(folder, storage.join(s3.bucket(), "photos"))
    inputs = find_inputs(uri)
    assert inputs.kind == "folder" and [i["id"] for i in inputs.items] == ["eye0", "eye1", "eye2"]
    assert [(u["id"], reason_kind(u["reason"])) for u in inputs.unreadable] == [("README", "not an image file")]
    assert all(i["source"] == f"{uri}/{i['id']}.png" and i["grade"] == -1 for i in inputs.items)

    kaggle = tmp_path / "kaggle"
    (kaggle / "test_images").mkdir(parents=True)
    for i in range(2):
        save(kaggle / "test_images" / f"t{i}.png", disc(i))
    (kaggle / "test.csv").write_text("id_code\nt0\nt1\nt2\n")
    (kaggle / "sample_submission.csv").write_text("id_code,diagnosis\nt0,0\n")
    inputs = find_inputs(s3.upload(kaggle, storage.join(s3.bucket(), "kaggle")), "test")
    assert inputs.kind == "csv" and [i["id"] for i in inputs.items] == ["t0", "t1"]
    assert inputs.unreadable[0]["id"] == "t2" and inputs.unreadable[0]["reason"] == "missing file"

    classes = tmp_path / "classes"
    for grade in (1, 3):
        (classes / str(grade)).mkdir(parents=True)
        save(classes / str(grade) / f"c{grade}.png", disc(grade))
    inputs = find_inputs(s3.upload(classes, storage.join(s3.bucket(), "classes")))
    assert inputs.kind == "class_folders" and [(i["id"], i["grade"]) for i in inputs.items] == [("c1", 1), ("c3", 3)]


def test_uri_options_reach_every_file_of_a_layout(s3, tmp_path, monkeypatch):
    """``?endpoint_override=...`` (MinIO, another S3 API) instead of the environment: the options
    stay on every path derived from the URI, down to the records the tasks open."""
    uri = s3.upload(write_broken_corpus(tmp_path / "raw"), storage.join(s3.bucket(), "raw"))
    monkeypatch.delenv("AWS_ENDPOINT_URL")  # only the URI knows where the server is
    options = f"?endpoint_override=127.0.0.1:{s3_server.PORT}&scheme=http"
    src = read_source(PrepareConfig(input=uri + options))
    assert {q["id"]: reason_kind(q["reason"]) for q in src.quarantined} == BROKEN
    good0 = next(r for r in src.records if r["id"] == "good0")
    assert good0["source"] == f"{uri}/train_images/good0.png{options}"
    assert read_image(good0, 32).shape == (48, 48, 3)


def test_missing_s3_input_is_one_clear_error(s3):
    with pytest.raises(DataError, match="input not found"):
        read_source(PrepareConfig(input=storage.join(s3.bucket(), "nothing-here")))


# ---------------------------------------------------------------- a local path the task's node does not have


def test_a_path_listed_on_another_disk_stops_the_job_instead_of_being_quarantined(tmp_path):
    save(tmp_path / "a.png", disc(1))
    listed = {"id": "a", "grade": 1, "source": str(tmp_path / "a.png"), "split": None, "order": 0}
    here = {**listed, "listed_on": storage.local_disk()}
    elsewhere = {**listed, "listed_on": "driver-host:4026531840"}
    assert read_image(elsewhere, 32).shape == (48, 48, 3)  # while the file is there, nothing to say
    os.remove(tmp_path / "a.png")
    cfg = PrepareConfig(image_size=32)
    # removed on this very disk since it was listed: a missing file, quarantined as before
    assert prepare_module.process_record(here, cfg)["reason"] == "missing file"
    # listed by a driver on another disk: the task says so, and the driver stops the job with one line
    reason = prepare_module.process_record(elsewhere, cfg)["reason"]
    assert reason == f"not on this node: {tmp_path / 'a.png'}"
    with pytest.raises(DriverOnlyPathError) as e:
        stop_on_driver_only_paths(["missing file", reason, reason])
    message = str(e.value)
    assert message.startswith(f"{tmp_path / 'a.png'} (and 1 other file): the file is on the driver's disk but not")
    assert "use a URI (s3://, gs://) or shared storage" in message and "\n" not in message
    stop_on_driver_only_paths(["missing file", "tiny image: 8x8 < 32"])  # bad images do not stop a job


@pytest.mark.ray
def test_prepare_job_stops_with_one_line_when_a_task_cannot_see_a_listed_file(tmp_path, ray_session, monkeypatch,
                                                                               capsys):
    """The driver lists the files as another disk; one of them is gone when the Ray task opens it."""
    raw = tmp_path / "raw"
    (raw / "images").mkdir(parents=True)
    for i in range(4):
        save(raw / "images" / f"x{i}.png", disc(i % 2, seed=i))
    (raw / "labels.csv").write_text("id_code,diagnosis\n" + "".join(f"x{i},{i % 2}\n" for i in range(4)))
    monkeypatch.setattr(storage, "local_disk", lambda: "the-driver:1")  # as listed by a driver elsewhere
    listing = prepare_module.read_source

    def list_then_lose_one(cfg):
        src = listing(cfg)
        os.remove(raw / "images" / "x2.png")  # the task's node does not have it
        return src

    monkeypatch.setattr(prepare_module, "read_source", list_then_lose_one)
    with pytest.raises(SystemExit) as exit_:
        run_job("prepare", [f"--prepare.input={raw}", f"--prepare.output={tmp_path / 'out'}",
                            "--prepare.image_size=32", "--prepare.card=false"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2
    assert err[-1].startswith(f"error: {raw / 'images' / 'x2.png'}: the file is on the driver's disk but not on the node")
    assert "use a URI (s3://, gs://) or shared storage" in err[-1]
    assert not (tmp_path / "out").exists()


@pytest.mark.ray
def test_every_node_is_asked_for_the_local_inputs_before_work_starts(tmp_path, ray_session, monkeypatch):
    """Two nodes (here: this one, listed twice): a local path that one of them lacks is named with
    its option and the node, before any task runs; URIs are not asked about."""
    from aptos_ray.ray_setup import check_seen_by_every_node

    (tmp_path / "data").mkdir()
    node = next(n for n in ray.nodes() if n["Alive"])
    monkeypatch.setattr(ray, "nodes", lambda: [node, {**node}])
    check_seen_by_every_node({"data.dataset": str(tmp_path / "data"), "predict.images": "s3://nowhere/x"})
    with pytest.raises(DriverOnlyPathError) as e:
        check_seen_by_every_node({"data.dataset": str(tmp_path / "data"), "predict.checkpoint": str(tmp_path / "gone")})
    assert str(e.value).startswith(f"{tmp_path / 'gone'} (--predict.checkpoint): the file is on the driver's disk "
                                   f"but not on node {node['NodeManagerAddress']} ({node['NodeID'][:8]}); use a URI")


# ---------------------------------------------------------------- the whole pipeline in a bucket


TINY = [*helpers.TINY, "--data.image_size=64", "--train.eval_batch_size=64", "--optim.warmup_epochs=1",
        "--train.tracking=none"]


@pytest.mark.ray
def test_pipeline_end_to_end_in_a_bucket(s3, tmp_path_factory, ray_session, monkeypatch, capsys):
    """Raw images in a bucket -> prepare -> train (Ray Train storage in the bucket, rank 0 killed in
    epoch 1 and resumed) -> predict from the bucket's checkpoint and raw images -> report. Run from
    an empty folder that must stay empty: nothing is written to local disk but Ray's temp."""
    from aptos_ray.config import SyntheticConfig
    from aptos_ray.data.synthetic import generate

    raw = generate(SyntheticConfig(output=str(tmp_path_factory.mktemp("src") / "raw"), num_images=30,
                                   image_size=64, seed=5))
    bucket = s3.bucket()
    s3.upload(raw, storage.join(bucket, "raw"))
    shutil.rmtree(raw)
    cwd = tmp_path_factory.mktemp("cwd")
    monkeypatch.chdir(cwd)
    started = time.perf_counter()

    def job(name: str, *args: str) -> None:
        run_job(name, list(args))
        print(f"{name}: {time.perf_counter() - started:.0f}s", file=sys.stderr)

    job("prepare", f"--prepare.input={bucket}/raw", f"--prepare.output={bucket}/prepared", "--prepare.image_size=64",
        "--prepare.card=false", "--prepare.val_fraction=0.3", "--prepare.test_fraction=0")
    manifest = json.loads(storage.read_text(f"{bucket}/prepared/manifest.json"))
    assert manifest["num_written"] == 30 and manifest["input"]["path"] == f"{bucket}/raw"

    monkeypatch.setattr(ray_backend, "train_worker", helpers.failing_worker)  # rank 0 dies once in epoch 1
    ray.cloudpickle.register_pickle_by_value(helpers)  # the workers cannot import tests/helpers.py
    job("train", *TINY, f"--data.dataset={bucket}/prepared", f"--train.output={bucket}/runs", "--train.name=e2e",
        "--train.epochs=2", "--scaling.num_workers=1", "--scaling.max_failures=1")
    run = f"{bucket}/runs/e2e"
    summary = json.loads(storage.read_text(f"{run}/summary.json"))
    assert storage.exists(f"{run}/.failure_injected")  # the worker really died, and the run went on
    assert [json.loads(line)["epoch"] for line in storage.read_text(f"{run}/metrics.jsonl").splitlines()] == [0, 1]
    assert summary["best_checkpoint"].startswith(f"{run}/checkpoint_epoch_")

    job("predict", f"--predict.checkpoint={run}", f"--predict.images={bucket}/raw", f"--predict.output={bucket}/pred",
        "--predict.num_actors=1", "--predict.tta=1")
    predictions = pd.read_parquet(storage.filesystem(f"{bucket}/pred/predictions.parquet")[1],
                                  filesystem=storage.filesystem(bucket)[0])
    assert len(predictions) == 30 and (predictions["grade"] >= 0).all()
    assert predictions["source"].str.startswith(f"{bucket}/raw/train_images/").all()
    keys = s3.keys(bucket)
    assert {"prepared/manifest.json", "runs/e2e/summary.json", "runs/e2e/config.yaml",
            "pred/submission.csv", "pred/report.html", "pred/metrics.json", "pred/predict.json"} <= set(keys)
    assert any(k.startswith("pred/predictions.parquet/") for k in keys)  # parts written by the workers
    assert {k.split("/")[2] for k in keys if k.startswith("runs/e2e/checkpoint_epoch_")} >= {"checkpoint_epoch_0001"}
    assert list(cwd.iterdir()) == []  # nothing on local disk: every job read and wrote the bucket
