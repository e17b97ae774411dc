"""Run history people browse: TensorBoard events in every run directory, and an MLflow run with
--train.tracking=mlflow (parameters, per-epoch metrics, best checkpoint), continued by --resume."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from aptos_ray.config import parse_args
from aptos_ray.train.driver import train
import helpers
from helpers import aptos_subset

TINY = [*helpers.TINY, "--local"]


@pytest.fixture(scope="module")
def tiny_data(aptos_dir, tmp_path_factory) -> Path:
    return aptos_subset(aptos_dir, tmp_path_factory.mktemp("aptos") / "prepared", per_grade=8, size=32)


def scalars(event_dir: Path) -> dict[str, dict[int, float]]:
    """tag -> {step: value} from TensorBoard event files (TFRecords of Event protos)."""
    from tensorboardX.proto.event_pb2 import Event

    out: dict[str, dict[int, float]] = {}
    for path in sorted(event_dir.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4  # length, its CRC, the record, its CRC
            for value in event.summary.value:
                out.setdefault(value.tag, {})[event.step] = value.simple_value
    return out


def test_every_run_directory_has_tensorboard_events(tiny_data, tmp_path):
    summary = train(parse_args([*TINY, f"--data.dataset={tiny_data}", f"--train.output={tmp_path}",
                                "--train.name=tb", "--train.epochs=2"]))
    events = scalars(tmp_path / "tb" / "tensorboard")
    history = [json.loads(line) for line in (tmp_path / "tb" / "metrics.jsonl").read_text().splitlines()]
    assert events["val_qwk"] == {h["epoch"]: pytest.approx(h["val_qwk"], abs=1e-6) for h in history}
    assert {"train_loss", "val_loss", "val_acc", "lr", "images_per_s"} <= set(events)
    assert summary["epochs"] == 2
    assert not (tmp_path / "tb" / "mlruns").exists()


def test_tracking_none_writes_no_history_besides_metrics(tiny_data, tmp_path):
    train(parse_args([*TINY, f"--data.dataset={tiny_data}", f"--train.output={tmp_path}", "--train.name=off",
                      "--train.epochs=1", "--train.tracking=none"]))
    assert (tmp_path / "off" / "metrics.jsonl").is_file() and not (tmp_path / "off" / "tensorboard").exists()


def test_mlflow_run_has_params_metrics_and_best_checkpoint_and_resume_continues_it(tiny_data, tmp_path):
    mlflow = pytest.importorskip("mlflow")
    args = [*TINY, f"--data.dataset={tiny_data}", f"--train.output={tmp_path}", "--train.name=ml",
            "--train.tracking=mlflow", "--optim.lr=0.01"]
    train(parse_args([*args, "--train.epochs=2"]))
    summary = train(parse_args([*args, "--train.epochs=3", "--resume"]))
    run_dir = tmp_path / "ml"
    client = mlflow.MlflowClient((run_dir / "mlruns").as_uri())
    runs = client.search_runs([client.get_experiment_by_name("aptos-ray").experiment_id])
    assert len(runs) == 1, "--resume continues the same MLflow run"
    run = runs[0]
    assert run.info.run_id == (run_dir / "mlflow_run_id.txt").read_text().strip()
    assert run.info.status == "FINISHED" and run.info.run_name == "ml"
    assert run.data.params["optim.lr"] == "0.01" and run.data.params["model.name"] == "test_efficientnet"
    qwk = client.get_metric_history(run.info.run_id, "val_qwk")
    assert sorted(m.step for m in qwk) == [0, 1, 2]
    assert run.data.tags["best_epoch"] == str(summary["best_epoch"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "best_checkpoint")}
    assert "best_checkpoint/model.pt" in artifacts
    import torch

    saved = torch.load(Path(run.info.artifact_uri.removeprefix("file://")) / "best_checkpoint" / "model.pt",
                       map_location="cpu", weights_only=True)
    assert saved["epoch"] == summary["best_epoch"]
