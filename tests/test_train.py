"""The training job: the local fallback in-process, the driver stopped and resumed, Ray Train DDP
with a worker killed mid-epoch. Tiny images and timm's tiny test model keep these within CI time."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import helpers
import numpy as np
import pytest
import ray
import torch
from helpers import aptos_subset, failing_worker

from aptos_ray.config import ConfigError, parse_args
from aptos_ray.train import ray_backend
from aptos_ray.train.checkpoint import checkpoint_folders, record_from_folders
from aptos_ray.train.driver import train

REPO = Path(__file__).resolve().parents[1]
TINY = [*helpers.TINY, "--optim.lr=0.003"]


@pytest.fixture(scope="module")
def aptos_small(aptos_dir, tmp_path_factory) -> Path:
    return aptos_subset(aptos_dir, tmp_path_factory.mktemp("aptos") / "prepared", per_grade=24, size=32)


def history(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_local_fit_writes_a_complete_run_directory(aptos_small, tmp_path):
    cfg = parse_args([*TINY, "--local", f"--data.dataset={aptos_small}", f"--train.output={tmp_path}",
                      "--train.name=local", "--train.epochs=3", "--data.sampling=inverse"])
    summary = train(cfg)
    run = tmp_path / "local"
    epochs = history(run)
    assert [h["epoch"] for h in epochs] == [0, 1, 2]
    manifest = json.loads((aptos_small / "manifest.json").read_text())
    num_val = sum(manifest["counts"]["val"].values())
    for h in epochs:
        assert h["val_images"] == num_val  # validation: every row once, never resampled
        assert 0 <= h["val_acc"] <= 1 and -1 <= h["val_qwk"] <= 1
        assert np.array(h["val_confusion"]).sum() == num_val
        assert sum(h["train_grade_counts"]) == h["train_images"]
    # inverse-frequency sampling balances grades that are unbalanced on disk (3 equal-ish here)
    seen = np.sum([h["train_grade_counts"] for h in epochs], axis=0)
    assert seen.min() > 0
    state = torch.load(Path(summary["best_checkpoint"]) / "model.pt", weights_only=True)
    assert state["config"]["model"]["name"] == "test_efficientnet"
    assert {"model", "optimizer", "scheduler", "scaler", "epoch", "cut_points"} <= set(state)
    assert (run / "config.yaml").is_file() and (run / "summary.json").is_file()
    assert (run / "plots" / "learning_curves.png").stat().st_size > 1000
    assert (run / "plots" / "confusion_best.png").stat().st_size > 1000
    kept = sorted(p.name for p in run.glob("checkpoint_epoch_*"))
    assert "checkpoint_epoch_0002" in kept and len(kept) <= cfg.train.keep_checkpoints + 1


def test_regression_head_saves_optimised_cut_points(aptos_small, tmp_path):
    cfg = parse_args([*TINY, "--local", f"--data.dataset={aptos_small}", f"--train.output={tmp_path}",
                      "--train.name=reg", "--train.epochs=1", "--model.head=regression"])
    summary = train(cfg)
    state = torch.load(Path(summary["best_checkpoint"]) / "model.pt", weights_only=True)
    cuts = state["cut_points"]
    assert len(cuts) == 4 and cuts == sorted(cuts)


def test_existing_run_is_not_overwritten_without_resume(aptos_small, tmp_path):
    args = [*TINY, "--local", f"--data.dataset={aptos_small}", f"--train.output={tmp_path}",
            "--train.name=once", "--train.epochs=1", "--train.max_steps_per_epoch=1"]
    train(parse_args(args))
    with pytest.raises(FileExistsError, match="--resume"):
        train(parse_args(args))


def test_sync_bn_on_cpu_workers_fails_before_ray_starts(aptos_small, tmp_path):
    with pytest.raises(ConfigError, match="batch_norm=sync needs GPU workers"):
        parse_args([*TINY, f"--data.dataset={aptos_small}", f"--train.output={tmp_path}",
                    "--model.batch_norm=sync", "--scaling.num_workers=2"])
    parse_args([*TINY, "--model.batch_norm=sync", "--scaling.num_workers=2", "--local"])  # one process: no DDP


@pytest.mark.parametrize("args, message", [
    (["--data.dataset=/nonexistent/prepared"], "manifest.json not found"),
    (["--data.dataset={data}", "--model.pretrained=/nonexistent/weights.pth", "--model.name=test_efficientnet",
      "--local"], "weights file not found"),
])
def test_job_user_errors_exit_2_without_traceback(aptos_small, tmp_path, args, message):
    args = [a.format(data=aptos_small) for a in args]
    proc = subprocess.run([sys.executable, str(REPO / "jobs" / "train.py"), *args, f"--train.output={tmp_path}",
                           "--train.epochs=1"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_a_dataset_without_validation_split_is_refused_before_training(aptos_small, tmp_path):
    """Prepared with prepare.val_fraction=0: every epoch is scored on validation, so say so up front."""
    import shutil

    data = tmp_path / "no_val"
    shutil.copytree(aptos_small, data)
    shutil.rmtree(data / "val")
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["counts"].pop("val")
    (data / "manifest.json").write_text(json.dumps(manifest))
    from aptos_ray.errors import DataError

    with pytest.raises(DataError, match="no validation images .*prepare.val_fraction > 0"):
        train(parse_args([*TINY, "--local", f"--data.dataset={data}", f"--train.output={tmp_path}/runs"]))
    assert not (tmp_path / "runs").exists()


def test_stopped_driver_resumes_without_losing_or_repeating_an_epoch(aptos_small, tmp_path):
    """Kill the local job (SIGKILL) after its first epoch, then --resume it."""
    args = [sys.executable, str(REPO / "jobs" / "train.py"), *TINY, "--local",
            f"--data.dataset={aptos_small}", f"--train.output={tmp_path}", "--train.name=stopped",
            "--train.epochs=4"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if checkpoint_folders(str(tmp_path / "stopped")):
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "stopped" / "metrics.jsonl").exists()  # written by the driver at the end only
    done_before = [h["epoch"] for h in record_from_folders(str(tmp_path / "stopped")).history]
    assert done_before and done_before[-1] < 3, "the job should have been stopped mid-run"
    out = subprocess.run([*args, "--resume"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Resumed from" in out.stdout
    assert [h["epoch"] for h in history(tmp_path / "stopped")] == [0, 1, 2, 3]


@pytest.mark.ray
def test_ray_ddp_survives_a_killed_worker_and_resumes(aptos_small, tmp_path, ray_session, monkeypatch):
    """2 DDP workers; rank 0 dies in epoch 1; Ray restarts the group from the epoch-0 checkpoint.
    Then the finished run is extended with --resume. The output path is relative, as people type
    it: Ray workers run elsewhere and must still write here."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(ray_backend, "train_worker", failing_worker)  # rank 0 dies once in epoch 1
    ray.cloudpickle.register_pickle_by_value(helpers)  # the workers cannot import tests/helpers.py
    args = [*TINY, f"--data.dataset={aptos_small}", "--train.output=runs", "--train.name=ddp",
            "--scaling.num_workers=2", "--scaling.max_failures=1",
            "--train.progress=true"]  # Ray's progress bars in the workers, as the demo shows them
    summary = train(parse_args([*args, "--train.epochs=2"]))
    run = tmp_path / "runs" / "ddp"
    assert (run / ".failure_injected").is_file()  # the worker really died
    epochs = history(run)
    assert [h["epoch"] for h in epochs] == [0, 1]  # nothing lost, nothing counted twice
    manifest = json.loads((aptos_small / "manifest.json").read_text())
    assert all(h["val_images"] == sum(manifest["counts"]["val"].values()) for h in epochs)
    assert summary["epochs"] == 2
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    summary = train(parse_args([*args, "--train.epochs=3", "--resume"]))
    assert [h["epoch"] for h in history(run)] == [0, 1, 2]
    assert summary["epochs"] == 3


def test_materialize_is_decided_by_size_against_the_object_store(aptos_small):
    """data.materialize=auto: materialise what fits in MATERIALIZE_SHARE of the store, stream the rest;
    true/false win whatever the size. The size is read from the Parquet footers (raw pixels + the rest)."""
    from aptos_ray.data.format import split_bytes

    store, share = 8 * 2**30, ray_backend.MATERIALIZE_SHARE
    decide = ray_backend.materialize_decision
    assert decide("auto", int(share * store), store)[0] is True
    assert decide("auto", int(share * store) + 1, store)[0] is False
    assert "streamed" in decide("auto", store, store)[1]
    assert decide(True, 10 * store, store)[0] is True and decide(False, 1, store)[0] is False
    n_train = sum(json.loads((aptos_small / "manifest.json").read_text())["counts"]["train"].values())
    assert n_train * 32 * 32 * 3 <= split_bytes(str(aptos_small), "train") < 2 * n_train * 32 * 32 * 3
    assert split_bytes(str(aptos_small), "test") == 0  # no such split
    assert parse_args(["--data.materialize=false"]).data.materialize is False
    assert parse_args([]).data.materialize == "auto"
    with pytest.raises(Exception, match="must be one of true, false, auto, got 'sometimes'"):
        parse_args(["--data.materialize=sometimes"])


def test_training_data_options_keep_order_and_raise_no_deprecation_warning():
    """The ingest options set the row order (train.deterministic) without touching Ray's deprecated
    ``exclude_resources``, whose copy in ``DataConfig.default_ingest_options`` warned in every run."""
    import warnings

    ray.data.DataContext.get_current()  # its own construction warns about other deprecated keys
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        assert ray_backend.execution_options(True).preserve_order is True
        assert ray_backend.execution_options(False).preserve_order is False


class _ShuffledSplit:
    """A whole split as one worker reads it when its order is not fixed: the rows in a
    rank-dependent order, cut into batches."""

    def __init__(self, ids: list[str], seed: int):
        self.ids = np.random.default_rng(seed).permutation(np.array(ids, dtype=object))

    def iter_batches(self, batch_size: int, batch_format: str):
        for start in range(0, len(self.ids), batch_size):
            yield {"id": self.ids[start:start + batch_size], "grade": np.zeros(len(self.ids[start:start + batch_size]))}


def test_each_validation_row_is_scored_by_exactly_one_worker_in_any_read_order():
    """Every worker reads the whole val split, each in its own order (streamed, several files,
    train.deterministic=false): the rows the ranks score still partition the split."""
    from aptos_ray.train.ray_backend import RayBackend

    ids = [f"img-{i}" for i in range(101)]
    for world_size in (2, 3):
        scored = []
        for rank in range(world_size):
            backend = RayBackend.__new__(RayBackend)  # the worker's state, without a Ray Train context
            backend.cfg, backend.rank, backend.world_size = parse_args(["--data.read_batch_size=16"]), rank, world_size
            backend.val_data = _ShuffledSplit(ids, seed=rank)
            scored += [i for batch in backend.val_rows() for i in batch["id"]]
        assert sorted(scored) == sorted(ids)


@pytest.mark.ray
def test_streamed_multi_file_val_split_is_scored_exactly_once_by_two_workers(tmp_path, ray_session, monkeypatch):
    """The real path: a val split in 4 Parquet files, data.materialize=false, train.deterministic=false,
    2 Ray Train workers: the union of the ids they score is the val split, each id once."""
    import helpers
    import pyarrow.parquet as pq

    from aptos_ray.train import ray_backend
    from aptos_ray.train.loop import DatasetInfo

    data = helpers.synthetic_subset(tmp_path / "data", size=16, per_grade=2, val_per_grade=8)
    whole = pq.read_table(data / "val" / "part-0.parquet")
    (data / "val" / "part-0.parquet").unlink()
    for k in range(4):  # several files: read by parallel tasks, in no fixed order
        pq.write_table(whole.slice(k * 10, 10), data / "val" / f"part-{k}.parquet")
    monkeypatch.setattr(ray_backend, "train_worker", helpers.val_ids_worker)
    ray.cloudpickle.register_pickle_by_value(helpers)  # the workers cannot import tests/helpers.py
    cfg = parse_args([f"--data.dataset={data}", f"--train.output={tmp_path}", "--train.name=val",
                      "--data.materialize=false", "--train.deterministic=false", "--scaling.num_workers=2",
                      "--scaling.cpus_per_worker=0.5",  # streamed reads need a free CPU on 2 cores
                      "--data.read_batch_size=4", "--model.name=test_efficientnet", "--model.pretrained=none"])
    manifest = json.loads((data / "manifest.json").read_text())
    trainer = ray_backend.build_trainer(cfg, DatasetInfo.for_data(cfg.data, manifest), ray_backend.load_datasets(cfg))
    trainer.fit()
    scored = [i for rank in (0, 1) for i in json.loads((tmp_path / f"val_ids-{rank}.json").read_text())]
    assert sorted(scored) == sorted(whole.column("id").to_pylist())
    assert len(json.loads((tmp_path / "val_ids-0.json").read_text())) > 0
    assert len(json.loads((tmp_path / "val_ids-1.json").read_text())) > 0
