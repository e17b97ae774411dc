"""The reliability corpus of issue #16: bad input, interrupted runs and misuse, one test per case.

Tiny data (60 shared APTOS images at 64 px, ``test_efficientnet``), ``--local`` unless Ray is the
point; the tests that kill processes or start Ray Train are ``slow``. docs/RELIABILITY.md has the
whole table of the issue (52 cases) with the numbers.

| case | what | expected | verdict (test) |
|---|---|---|---|
| 1 | checkpoint killed while written, then --resume | no half checkpoint; a corrupt one is skipped with a warning, the one before is used | correct (test_case01_*) |
| 2 | validation QWK ties (lr 0, frozen BatchNorm) | summary's best checkpoint is kept; predict from the run dir works | correct (test_case02_*) |
| 3 | Ray worker SIGKILLed right after an epoch's report | the run continues from that epoch | correct (test_case03_*, slow) |
| 4 | prepare SIGKILLed mid-run, then rerun | no `.NAME.tmp-*` left behind | correct (test_case04_*, slow + fast) |
| 5 | symlink to a PNG outside the input folder | followed, the resolved file recorded; with prepare.follow_symlinks=false quarantined "path escapes the input folder" | correct (test_case05_*) |
| 6 | prepare.output inside prepare.input; our own outputs in a class folder | one-line DataError; outputs skipped with a note | one-line error (test_case06_*) |
| 7 | all-black 10000x10000 PNG; uniform grey image | quarantined before decoding / as blank | quarantined (test_case07_*) |
| 8 | tune resume of a folder with a planted tuner.pkl; auth token mode | refused before unpickling; token 0600 | one-line error (test_case08_*) |
| 9 | checkpoint whose model/head differs from the config (resume, predict) | one line naming checkpoint and difference | one-line error (test_case09_*) |
| 10 | num_workers x cpus_per_worker larger than the cluster | one line before fit: what it has, what was asked | one-line error (test_case10_*) |
| 11 | a UserError in a Ray worker (bad model name) | no retries: the run ends after one attempt | one-line error (test_case11_*, slow) |
| 12 | corrupt model.pt given to predict | "<path>: not a valid checkpoint (truncated or not a training checkpoint)" | one-line error (test_case12_*) |
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import helpers
from helpers import aptos_subset
from PIL import Image

from aptos_ray.config import PrepareConfig, parse_args
from aptos_ray.data.prepare import prepare
from aptos_ray.data.sources import read_image, read_source, reason_kind
from aptos_ray.errors import ConfigError, CorruptCheckpointError, DataError, ExistingFileError, ImageError
from aptos_ray.train.checkpoint import read_checkpoint
from aptos_ray.infer.grader import Grader
from aptos_ray.train import loop as local_backend
from aptos_ray.train.checkpoint import checkpoint_folders
from aptos_ray.train.driver import train

TINY = ["--local", *helpers.TINY, "--model.head=regression"]


@pytest.fixture(scope="module")
def p60(aptos_dir, tmp_path_factory) -> Path:
    """60 shared APTOS images (12 per grade) at 64 px, as a prepared dataset (trained at 32 px)."""
    return aptos_subset(aptos_dir, tmp_path_factory.mktemp("p60") / "p60", per_grade=12, size=64)


def run_args(p60: Path, out: Path, name: str, epochs: int, *extra: str) -> list[str]:
    return [*TINY, f"--data.dataset={p60}", f"--train.output={out}", f"--train.name={name}",
            f"--train.epochs={epochs}", *extra]


@pytest.fixture(scope="module")
def two_epochs(p60, tmp_path_factory) -> Path:
    """One finished 2-epoch local run (regression head, both checkpoints kept), copied by the tests
    that resume it: training once is what keeps this corpus within CI's time."""
    out = tmp_path_factory.mktemp("runs")
    train(parse_args(run_args(p60, out, "r", 2, "--model.head=regression", "--train.keep_checkpoints=2")))
    return out / "r"


def copy_run(run: Path, out: Path) -> Path:
    shutil.copytree(run, out / run.name)
    return out / run.name


def history(run_dir: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def class_folders(aptos_dir: Path, root: Path, per_grade: int = 2) -> Path:
    """``root/<grade>/<id>.png`` copies of a few shared images (in tmp, never in the repo)."""
    labels = [line.split(",") for line in (aptos_dir / "labels.csv").read_text().splitlines()[1:]]
    for grade in ("0", "1"):
        (root / grade).mkdir(parents=True)
        for id_, _ in [r for r in labels if r[1] == grade][:per_grade]:
            shutil.copy(aptos_dir / "images" / f"{id_}.png", root / grade / f"{id_}.png")
    return root


# ---------------------------------------------------------------- 1, 2: local checkpoints


def test_case01_corrupt_latest_checkpoint_is_skipped_on_resume(p60, two_epochs, tmp_path, capsys):
    run = copy_run(two_epochs, tmp_path)
    latest = run / "checkpoint_epoch_0001" / "model.pt"
    with open(latest, "r+b") as f:
        f.truncate(latest.stat().st_size // 2)
    summary = train(parse_args(run_args(p60, tmp_path, "r", 2, "--model.head=regression",
                                        "--train.keep_checkpoints=2", "--resume")))
    err = capsys.readouterr()
    assert "skipping the checkpoint of epoch 1" in err.err and "not a valid checkpoint" in err.err
    assert "Resumed from the checkpoint of epoch 0" in err.out
    assert history(run) == [0, 1] and summary["epochs"] == 2
    assert read_checkpoint(str(run / "checkpoint_epoch_0001")).epoch == 1  # rewritten whole


def test_case01_a_checkpoint_without_training_state_predicts_and_resume_skips_it(p60, two_epochs, tmp_path,
                                                                                capsys):
    """A model.pt kept for inference only (weights, config, no optimizer state) is read the same way by
    predict and by a resume: predict uses it, the resume takes the checkpoint before it."""
    import torch

    run = copy_run(two_epochs, tmp_path)
    latest = run / "checkpoint_epoch_0001" / "model.pt"
    state = torch.load(latest, weights_only=True)
    del state["optimizer"]
    torch.save(state, latest)
    assert read_checkpoint(str(latest)).epoch == 1
    with pytest.raises(CorruptCheckpointError, match="not a valid checkpoint"):
        read_checkpoint(str(latest), resume=True)
    restored = read_checkpoint(str(run / "checkpoint_epoch_0000"), resume=True)
    assert [h["epoch"] for h in restored.history] == [0] and restored.optimizer["state"]
    summary = train(parse_args(run_args(p60, tmp_path, "r", 2, "--model.head=regression",
                                        "--train.keep_checkpoints=2", "--resume")))
    out = capsys.readouterr()
    assert "skipping the checkpoint of epoch 1" in out.err and "Resumed from the checkpoint of epoch 0" in out.out
    assert history(run) == [0, 1] and summary["epochs"] == 2


def test_case01_kill_while_writing_leaves_no_half_checkpoint(p60, two_epochs, tmp_path, monkeypatch):
    """The copy into the run directory dies halfway in epoch 2 (as a kill would): the folder that
    exists is the hidden one written aside, never a checkpoint_epoch_0002 that --resume would take."""
    run = copy_run(two_epochs, tmp_path)
    args = run_args(p60, tmp_path, "r", 3, "--model.head=regression", "--train.keep_checkpoints=2", "--resume")
    real_copytree = shutil.copytree

    class Killed(BaseException):
        pass

    def dying_copytree(src, dst, *a, **kw):
        if Path(dst).name.startswith(".checkpoint_epoch_0002"):
            Path(dst).mkdir()
            (Path(dst) / "model.pt").write_bytes((Path(src) / "model.pt").read_bytes()[:1000])
            raise Killed
        return real_copytree(src, dst, *a, **kw)

    monkeypatch.setattr(local_backend.shutil, "copytree", dying_copytree)
    with pytest.raises(Killed):
        train(parse_args(args))
    monkeypatch.undo()
    assert not (run / "checkpoint_epoch_0002").exists() and sorted(checkpoint_folders(str(run))) == [0, 1]
    killed_elsewhere = run / ".checkpoint_epoch_0002.tmp-999999999"  # a process that no longer runs
    (run / f".checkpoint_epoch_0002.tmp-{os.getpid()}").rename(killed_elsewhere)
    train(parse_args(args))
    assert history(run) == [0, 1, 2]
    assert not killed_elsewhere.exists() and not list(run.glob(".checkpoint_*"))  # no hidden leftovers


def test_case02_tied_qwk_best_checkpoint_exists_and_predicts(p60, two_epochs, tmp_path):
    # A learning rate far below float32's resolution (0 itself is refused) and frozen BatchNorm
    # statistics (those of the shared run's weights): the model's outputs never change, so every
    # epoch scores the same (with a tiny lr alone the running statistics still move)
    weights = two_epochs / "checkpoint_epoch_0001" / "model.pt"
    args = [a for a in run_args(p60, tmp_path, "tie", 2, "--optim.lr=1e-30", "--model.batch_norm=frozen",
                                "--model.head=regression", "--train.keep_checkpoints=1", f"--model.pretrained={weights}")
            if a != "--model.pretrained=none"]
    summary = train(parse_args(args))
    run = tmp_path / "tie"
    qwks = {json.loads(line)["val_qwk"] for line in (run / "metrics.jsonl").read_text().splitlines()}
    assert len(qwks) == 1
    assert summary["best_epoch"] == 1  # of equal scores the later epoch, the one pruning keeps
    assert (Path(summary["best_checkpoint"]) / "model.pt").is_file()
    checkpoint = read_checkpoint(str(run))  # what predict does with a run directory
    assert checkpoint.epoch == 1
    out = Grader(checkpoint)(np.zeros((2, 64, 64, 3), np.uint8))
    assert out["predicted"].shape == (2,)


# ---------------------------------------------------------------- 4: leftovers of a killed prepare


def test_case04_leftovers_of_dead_writers_are_removed(tmp_path):
    from aptos_ray import storage

    target = tmp_path / "prepared"
    dead = tmp_path / ".prepared.tmp-999999999-deadbeef"  # no such process
    alive = tmp_path / f".prepared.tmp-{os.getpid()}-cafe0000"  # this process: still writing
    for folder in (dead, alive):
        (folder / "train").mkdir(parents=True)
    with storage.publish_dir(str(target)) as out:
        (out / "manifest.json").write_text("{}")
    assert not dead.exists() and alive.exists() and (target / "manifest.json").is_file()


# ---------------------------------------------------------------- 5, 6, 7: foreign data


def test_case05_symlink_out_of_the_input_is_followed_or_quarantined_on_request(aptos_dir, tmp_path):
    """Links into an image store elsewhere are followed by default (the resolved file is recorded);
    ``prepare.follow_symlinks=false`` (untrusted inputs) quarantines them."""
    raw = class_folders(aptos_dir, tmp_path / "raw")
    elsewhere = tmp_path / "elsewhere.png"
    shutil.copy(next((raw / "1").iterdir()), elsewhere)
    (raw / "0" / "outside.png").symlink_to(elsewhere)
    src = read_source(PrepareConfig(input=str(raw)))
    assert {r["id"]: r["source"] for r in src.records}["outside"] == str(elsewhere)
    assert "outside" not in {q["id"] for q in src.quarantined}
    src = read_source(PrepareConfig(input=str(raw), follow_symlinks=False))
    reasons = {q["id"]: q["reason"] for q in src.quarantined}
    assert reasons["outside"].startswith("path escapes the input folder: ")
    assert str(elsewhere) in reasons["outside"]
    assert "outside" not in {r["id"] for r in src.records}


def test_case05_a_link_inside_the_input_to_a_file_it_holds_is_a_duplicate(aptos_dir, tmp_path):
    raw = class_folders(aptos_dir, tmp_path / "raw")
    target = min((raw / "1").iterdir())
    (raw / "0" / "inside.png").symlink_to(target)  # one photograph, two grades
    src = read_source(PrepareConfig(input=str(raw)))
    reasons = {q["id"]: q["reason"] for q in src.quarantined}
    first, later = sorted(["inside", target.stem], key=lambda i: "0" if i == "inside" else "1")
    assert reason_kind(reasons[later]) == "duplicate file" and first in {r["id"] for r in src.records}


def test_case05_csv_layout_symlink_is_followed_or_quarantined_on_request(aptos_dir, tmp_path):
    raw = class_folders(aptos_dir, tmp_path / "raw")
    images = tmp_path / "kaggle" / "train_images"
    images.mkdir(parents=True)
    rows = []
    for grade in ("0", "1"):
        for png in (raw / grade).iterdir():
            shutil.copy(png, images / png.name)
            rows.append(f"{png.stem},{grade}")
    (images / "link.png").symlink_to(tmp_path / "raw" / "0" / min(os.listdir(raw / "0")))
    (images.parent / "train.csv").write_text("id_code,diagnosis\n" + "\n".join([*rows, "link,2"]) + "\n")
    src = read_source(PrepareConfig(input=str(images.parent)))
    link = {r["id"]: r["source"] for r in src.records}["link"]
    assert link == str((tmp_path / "raw" / "0" / min(os.listdir(raw / "0"))).resolve())
    src = read_source(PrepareConfig(input=str(images.parent), follow_symlinks=False))
    assert reason_kind({q["id"]: q["reason"] for q in src.quarantined}["link"]) == "path escapes the input folder"


def test_case06_output_inside_input_is_refused(aptos_dir, tmp_path):
    raw = class_folders(aptos_dir, tmp_path / "raw")
    cfg = parse_args([f"--prepare.input={raw}", f"--prepare.output={raw / '0' / 'prepared'}"])
    with pytest.raises(DataError, match="prepare.output is inside prepare.input"):
        prepare(cfg)
    assert not (raw / "0" / "prepared").exists()


def test_case06_own_outputs_in_a_class_folder_are_skipped(aptos_dir, tmp_path, capsys):
    raw = class_folders(aptos_dir, tmp_path / "raw")
    dataset = raw / "0" / "old_prepared"  # e.g. prepared there before the check existed
    (dataset / "card").mkdir(parents=True)
    (dataset / "manifest.json").write_text("{}")
    shutil.copy(next((raw / "1").iterdir()), dataset / "card" / "grades.png")
    (raw / "1" / ".prep.tmp-1-abc").mkdir()  # a writer's staging folder
    shutil.copy(next((raw / "1").iterdir()), raw / "1" / ".prep.tmp-1-abc" / "x.png")
    src = read_source(PrepareConfig(input=str(raw)))
    assert len(src.records) == 4 and not src.quarantined  # 2 per class, nothing from our outputs
    assert src.info["skipped_own_outputs"] == [str(dataset)]
    assert "skipped 1 folder(s) written by prepare itself" in capsys.readouterr().out


def test_case07_huge_image_is_quarantined_from_its_header(tmp_path):
    path = tmp_path / "black.png"
    Image.new("1", (10000, 10000)).save(path, optimize=True)  # 100 MP, a few KB on disk
    assert path.stat().st_size < 200_000
    with pytest.raises(ImageError) as e:
        read_image({"source": str(path)}, min_side=32, max_pixels=PrepareConfig().max_pixels)
    assert e.value.reason == "image too large: 10000x10000 = 100.0 MP > prepare.max_pixels 50.0 MP"


def test_case07_uniform_images_are_quarantined_as_blank(aptos_dir, tmp_path):
    grey = tmp_path / "grey.png"
    Image.new("RGB", (300, 200), (128, 128, 128)).save(grey)
    with pytest.raises(ImageError) as e:
        read_image({"source": str(grey)}, min_side=32)
    assert reason_kind(e.value.reason) == "blank image"
    with pytest.raises(ImageError, match="blank image"):
        read_image({"id": "a", "array": np.zeros((28, 28), np.uint8)}, min_side=32)
    real = next((aptos_dir / "images").iterdir())
    assert read_image({"source": str(real)}, min_side=32).std() > 10  # a fundus photograph passes


# ---------------------------------------------------------------- 9, 12: checkpoints that do not fit


def test_case09_resume_with_another_head_is_one_line(p60, two_epochs, tmp_path):
    copy_run(two_epochs, tmp_path)
    with pytest.raises(ConfigError) as e:  # refused from the run's config.yaml, before its checkpoints are read
        train(parse_args(run_args(p60, tmp_path, "r", 3, "--model.head=classification", "--resume")))
    text = str(e.value)
    assert "\n" not in text and str(tmp_path / "r") in text
    assert "model.head=classification (was regression)" in text


def test_case09_weights_that_do_not_fit_the_model_are_one_line(two_epochs):
    checkpoint = read_checkpoint(str(two_epochs / "checkpoint_epoch_0001"))
    checkpoint.config.model.head = "classification"  # a config edited by hand: 5 outputs, 1 saved
    with pytest.raises(CorruptCheckpointError) as e:
        Grader(checkpoint)
    assert "\n" not in str(e.value) and "do not fit model test_efficientnet" in str(e.value)
    assert "size mismatch" in str(e.value)


def test_case12_corrupt_model_pt_says_so_plainly(tmp_path):
    bad = tmp_path / "model.pt"
    bad.write_bytes(b"PK\x03\x04" + b"\x00" * 500)  # starts like a zip, is not one
    with pytest.raises(CorruptCheckpointError) as e:
        read_checkpoint(str(bad))
    assert str(e.value) == f"{bad}: not a valid checkpoint (truncated or not a training checkpoint)"


# ---------------------------------------------------------------- 10, 11: Ray resources and retries


def test_case10_cluster_too_small_is_refused_before_fit():
    from aptos_ray.ray_internals import NodeType
    from aptos_ray.train.ray_backend import check_cluster_fits

    cfg = parse_args(["--scaling.num_workers=3", "--scaling.cpus_per_worker=2"])
    with pytest.raises(ConfigError) as e:
        check_cluster_fits(cfg, [NodeType("head", {"CPU": 4.0}, 1)])
    assert str(e.value).startswith("the Ray cluster cannot fit this run: scaling.num_workers=3 workers of 2 CPU "
                                   "each, but its nodes (counting the autoscaler's node types up to their "
                                   "max_workers) hold at most 2")
    gpu = parse_args(["--scaling.num_workers=2", "--scaling.use_gpu=true"])
    with pytest.raises(ConfigError, match=r"one worker asks for 1 CPU \+ 1 GPU and no node of the cluster has "
                                          r"that much \(the most any has: 8 CPU, 0 GPU\)"):
        check_cluster_fits(gpu, [NodeType("head", {"CPU": 8.0}, 1)])
    check_cluster_fits(parse_args(["--scaling.num_workers=2"]), [NodeType("head", {"CPU": 2.0}, 1)])  # fits exactly


def test_autoscaler_node_types_admit_nodes_not_started_yet():
    """A CPU head and a GPU node type with min_workers 0: what the node types can hold is admitted,
    only what none can ever hold (or more workers than max_workers nodes hold) is refused."""
    from aptos_ray.ray_internals import node_types_from_autoscaling_config
    from aptos_ray.train.ray_backend import check_cluster_fits

    types = node_types_from_autoscaling_config({
        "max_workers": 10, "head_node_type": "head",
        "available_node_types": {"head": {"resources": {"CPU": 2}, "max_workers": 0},
                                 "gpu": {"resources": {"CPU": 8, "GPU": 2}, "min_workers": 0, "max_workers": 2}}})
    check_cluster_fits(parse_args(["--scaling.num_workers=4", "--scaling.use_gpu=true"]), types)
    with pytest.raises(ConfigError, match="workers of 1 CPU \\+ 1 GPU each, but .* hold at most 4"):
        check_cluster_fits(parse_args(["--scaling.num_workers=5", "--scaling.use_gpu=true"]), types)
    with pytest.raises(ConfigError, match=r"one worker asks for 16 CPU \+ 1 GPU and no node type .* 2 GPU\)"):
        check_cluster_fits(parse_args(["--scaling.num_workers=1", "--scaling.use_gpu=true",
                                       "--scaling.cpus_per_worker=16"]), types)
    # two workers sharing a GPU (gpus_per_worker=0.5): 2 nodes x 2 GPUs x 2 workers
    check_cluster_fits(parse_args(["--scaling.num_workers=8", "--scaling.use_gpu=true",
                                   "--scaling.gpus_per_worker=0.5"]), types)


# ---------------------------------------------------------------- 8: code from a planted file


class Planted:
    """Unpickling this runs code: it leaves a marker file (what an attacker's payload would do)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path(self.marker).write_text, ("pwned",))


def test_case08_resume_refuses_a_planted_search_folder(tmp_path, monkeypatch):
    import pickle

    from aptos_ray.tune import trust
    from aptos_ray.tune.search import run_search

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    exp = tmp_path / "tune" / "s"
    exp.mkdir(parents=True)
    marker = tmp_path / "pwned"
    (exp / "tuner.pkl").write_bytes(pickle.dumps(Planted(str(marker))))
    args = [f"--tune.output={tmp_path / 'tune'}", "--tune.name=s", "--tune.resume=true"]
    with pytest.raises(trust.UntrustedSearchError, match="not signed by this project"):
        run_search(parse_args(args))  # refused before Ray or anything unpickles the folder
    assert not marker.exists()

    (exp / "tuner.pkl").write_bytes(pickle.dumps({"state": 1}))  # what our own search wrote
    (exp / "experiment_state-1.json").write_text("{}")
    (exp / "search_config.yaml").write_text("train: {epochs: 2}\n")
    trust.sign(str(exp))
    key = trust.key_path()
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    trust.verify(str(exp))  # our own folder passes
    (exp / "trial_1").mkdir()
    (exp / "trial_1" / "params.pkl").write_bytes(pickle.dumps(Planted(str(marker))))  # planted later
    with pytest.raises(trust.UntrustedSearchError, match=r"changed since this project signed it \(trial_1/params.pkl\)"):
        trust.verify(str(exp))
    (exp / "trial_1" / "params.pkl").unlink()
    (exp / "search_config.yaml").write_text("train: {epochs: 200}\n")  # the config a resume reloads
    with pytest.raises(trust.UntrustedSearchError, match="search_config.yaml"):
        trust.verify(str(exp))
    (exp / "search_config.yaml").write_text("train: {epochs: 2}\n")
    (exp / "tuner.pkl").write_bytes(pickle.dumps(Planted(str(marker))))  # replaced
    with pytest.raises(trust.UntrustedSearchError, match="tuner.pkl"):
        trust.verify(str(exp))
    trust.sign(str(exp))
    exp.chmod(0o777)  # world-writable: anyone could have planted it before we signed
    with pytest.raises(trust.UntrustedSearchError, match="writable by every user"):
        trust.verify(str(exp))
    exp.chmod(0o755)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "other_user"))
    trust.signing_key(create=True)
    with pytest.raises(trust.UntrustedSearchError, match="does not match this user's key"):
        trust.verify(str(exp))
    assert not marker.exists()


def test_case08_generated_auth_token_is_owner_only_from_the_start(tmp_path, monkeypatch):
    """scripts/two_node_run.py's token file is created 0600, not written 0644 and chmod-ed after."""
    import importlib.util

    script = Path(__file__).resolve().parents[1] / "scripts" / "two_node_run.py"
    spec = importlib.util.spec_from_file_location("two_node_run", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(Path, "chmod", lambda self, mode: None)  # only the mode it was created with counts
    old = os.umask(0o022)  # the usual umask, under which a plain write makes 0644
    try:
        cluster = module.TwoNodeCluster(tmp_path)
    finally:
        os.umask(old)
    token = Path(cluster.env["RAY_AUTH_TOKEN_PATH"])
    assert oct(token.stat().st_mode & 0o777) == "0o600"


# ---------------------------------------------------------------- 3, 11: Ray Train runs


@pytest.mark.slow
def test_case03_worker_killed_right_after_a_report_resumes_from_that_epoch(p60, tmp_path, ray_session, monkeypatch):
    """Rank 0 is SIGKILLed the moment epoch 1's report returns, before Ray Train's controller has
    collected it: the restart must continue from epoch 1's checkpoint, training epoch 2 only."""
    import helpers
    import ray

    from aptos_ray.train import ray_backend

    monkeypatch.setattr(ray_backend, "train_worker", helpers.killed_after_report_worker)
    ray.cloudpickle.register_pickle_by_value(helpers)  # the workers cannot import tests/helpers.py
    args = [a for a in run_args(p60, tmp_path, "kill", 3, "--scaling.num_workers=2", "--scaling.max_failures=1")
            if a != "--local"]
    summary = train(parse_args(args))
    run = tmp_path / "kill"
    assert (run / ".killed_after_report").is_file()  # the worker really died
    assert (run / ".epochs_started").read_text().split() == ["0", "1", "2"]  # nothing trained twice
    assert history(run) == [0, 1, 2] and summary["epochs"] == 3
    assert Path(summary["best_checkpoint"]).is_dir()


@pytest.mark.slow
def test_case11_user_error_in_a_worker_is_not_retried(p60, tmp_path, ray_session, monkeypatch):
    import helpers
    import ray

    from aptos_ray.train import ray_backend

    monkeypatch.setattr(ray_backend, "train_worker", helpers.user_error_worker)
    ray.cloudpickle.register_pickle_by_value(helpers)
    args = [a for a in run_args(p60, tmp_path, "bad", 1, "--scaling.num_workers=1", "--scaling.max_failures=3")
            if a != "--local"]
    with pytest.raises(ConfigError, match="unknown timm model 'no_such_net'"):
        train(parse_args(args))
    assert len(list(tmp_path.glob(".attempts-*"))) == 1  # one attempt, not 1 + max_failures


def test_case11_bad_model_name_fails_in_the_driver_before_ray(p60, tmp_path):
    args = [a for a in run_args(p60, tmp_path, "bad", 1, "--model.name=no_such_net") if a != "--local"]
    with pytest.raises(ConfigError, match="model.name: 'no_such_net' is not a timm model"):
        train(parse_args(args))
    assert not (tmp_path / "bad").exists()


def test_case08_default_ray_token_is_made_owner_only(tmp_path, monkeypatch):
    from aptos_ray.ray_setup import private_default_token

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    old = os.umask(0o022)
    try:
        private_default_token()  # none yet: made 0600
        token = tmp_path / ".ray" / "auth_token"
        assert oct(token.stat().st_mode & 0o777) == "0o600" and len(token.read_text()) == 64
        token.chmod(0o644)  # one Ray wrote earlier
        private_default_token()
        assert oct(token.stat().st_mode & 0o777) == "0o600"
    finally:
        os.umask(old)


@pytest.mark.slow
def test_case04_sigkilled_prepare_leaves_nothing_after_a_rerun(aptos_dir, tmp_path):
    """A real prepare job SIGKILLed once its staging folder exists; the rerun publishes the dataset
    and removes the dead writer's ``.prepared.tmp-PID-*``."""
    import signal
    import subprocess
    import sys
    import time

    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "prepared"
    cmd = [sys.executable, str(repo / "jobs" / "prepare.py"), f"--prepare.input={aptos_dir}",
           f"--prepare.output={out}", "--prepare.limit=60", "--prepare.image_size=64", "--prepare.card=false"]
    env = {**os.environ, "RAY_ADDRESS": "", "PYTHONPATH": str(repo)}
    # its own process group: the kill takes the local Ray it started along, as a killed job's would go
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 300
    while not list(tmp_path.glob(".prepared.tmp-*")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert list(tmp_path.glob(".prepared.tmp-*")), "prepare never started writing"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()  # nothing half-published
    subprocess.run(cmd, cwd=tmp_path, env=env, check=True, capture_output=True, timeout=600)
    assert (out / "manifest.json").is_file()
    assert not list(tmp_path.glob(".prepared.*")), "a leftover of the killed writer"


# === issue 26 (config and run ownership): one writer per run, resume that keeps the run's own config,
# predict that keeps the model's preprocessing, YAML that cannot lie or explode, mixed ensembles ===


def test_issue26_yaml_duplicate_key_is_refused_with_its_line(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("train:\n  epochs: 3\n  name: a\n  epochs: 5\n")
    with pytest.raises(ConfigError, match=r"duplicate key 'epochs' on line 4, first on line 2"):
        parse_args(["--config", str(path)])
    path.write_text("train: {epochs: 3}\ntrain: {name: a}\n")  # a whole section twice
    with pytest.raises(ConfigError, match=r"duplicate key 'train' on line 2"):
        parse_args(["--config", str(path)])
    # a merge key may still be overridden by the mapping that merges it
    path.write_text("train:\n  <<: {epochs: 3, batch_size: 4}\n  epochs: 5\n")
    cfg = parse_args(["--config", str(path)])
    assert (cfg.train.epochs, cfg.train.batch_size) == (5, 4)


def test_issue26_yaml_alias_bomb_is_refused_quickly_in_one_short_line(tmp_path):
    levels = ["&a [lol,lol,lol,lol,lol,lol,lol,lol,lol]"]
    for prev, name in zip("abcdef", "bcdefg"):
        levels.append(f"&{name} [{','.join([f'*{prev}'] * 9)}]")
    path = tmp_path / "bomb.yaml"
    path.write_text(f"train:\n  name: [{', '.join(levels)}]\n")  # 9**7 values in a few hundred bytes
    assert path.stat().st_size < 400
    with pytest.raises(ConfigError, match="alias bomb") as e:
        parse_args(["--config", str(path)])
    assert len(str(e.value)) < 300
    # a long or nested value is cut in the error
    with pytest.raises(ConfigError) as e:
        parse_args([f"--train.epochs=[{','.join(['x' * 500] * 500)}]"])
    assert "train.epochs" in str(e.value) and len(str(e.value)) < 300


def test_issue26_config_that_is_a_directory_says_so(tmp_path):
    with pytest.raises(ConfigError, match="is a directory, not a YAML file"):
        parse_args(["--config", str(tmp_path)])
    deep = tmp_path / "deep.yaml"
    deep.write_text("train: {name: " + "[" * 3000 + "]" * 3000 + "}\n")
    with pytest.raises(ConfigError, match="nested too deeply"):
        parse_args(["--config", str(deep)])
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConfigError, match="cannot be read"):
        parse_args(["--config", str(binary)])


HOLD_CLAIM = """
import sys, time
from aptos_ray.ownership import claimed
with claimed(sys.argv[1], "run", "wait"):
    print("held", flush=True)
    time.sleep(120)
"""


def hold_claim(folder: Path):
    """Another process holding ``folder`` as the train driver does, until it is killed."""
    import subprocess
    import sys

    holder = subprocess.Popen([sys.executable, "-c", HOLD_CLAIM, str(folder)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_issue26_a_run_folder_in_use_is_refused_in_one_line(p60, tmp_path):
    """A second training of the same name while the first runs: refused before anything is written;
    once the first is killed (kill -9: its lock dies with it), the name is free again."""
    holder = hold_claim(tmp_path / "same")
    try:
        with pytest.raises(ExistingFileError) as e:
            train(parse_args(run_args(p60, tmp_path, "same", 1)))
        text = str(e.value)
        assert "\n" not in text and "is in use by another run" in text and f"pid {holder.pid}" in text
        assert sorted(p.name for p in (tmp_path / "same").iterdir()) == [".owner.lock"]  # nothing written
    finally:
        holder.kill()
        holder.wait()
    from aptos_ray.ownership import claimed

    with claimed(str(tmp_path / "same"), "run", "wait"):  # a dead owner's claim is gone: no stale lock
        pass


def test_issue26_unnamed_runs_started_in_the_same_second_get_their_own_folders(tmp_path, monkeypatch):
    from aptos_ray.train.driver import run_name

    cfg = parse_args([f"--train.output={tmp_path}"])
    names = [run_name(cfg) for _ in range(3)]  # well within one second
    assert len(set(names)) == 3 and all(n.startswith("run-") for n in names)
    assert names[1] == f"{names[0]}-2" and all((tmp_path / n).is_dir() for n in names)


def test_issue26_a_run_folder_that_is_a_file_is_one_line(p60, tmp_path):
    (tmp_path / "taken").write_text("not a run")
    with pytest.raises(ExistingFileError, match="is a file, not a folder"):
        train(parse_args(run_args(p60, tmp_path, "taken", 1)))


def run_job_line(job: str, argv: list[str], capsys) -> str:
    """Run ``job`` as its command line does; the one line it printed when it exited with status 2."""
    from aptos_ray.cli import run_job

    with pytest.raises(SystemExit) as e:
        run_job(job, argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    return err


def test_issue26_resume_takes_the_runs_own_config(p60, two_epochs, tmp_path, monkeypatch, capsys):
    """The README's ``--resume --train.name=NAME``: the run's saved config (model, data, head, local),
    with only the epochs grown from the command line; no synthetic data generated on the way."""
    from aptos_ray.cli import run_job

    run = copy_run(two_epochs, tmp_path / "runs")
    monkeypatch.chdir(tmp_path)
    run_job("train", ["--resume", "--train.name=r", "--train.output=runs", "--train.epochs=3"])
    assert history(run) == [0, 1, 2]
    assert not (tmp_path / "data").exists()  # the embedded default was not generated
    saved = (run / "config.yaml").read_text()
    assert "test_efficientnet" in saved and "epochs: 3" in saved


def test_issue26_resume_refuses_what_changes_the_checkpoints_meaning(p60, two_epochs, tmp_path, monkeypatch, capsys):
    run = copy_run(two_epochs, tmp_path / "runs")
    monkeypatch.chdir(tmp_path)
    def files() -> dict:  # the claim's own lock file aside
        return {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.name != ".owner.lock"}

    before = files()
    base = ["--resume", "--train.name=r", "--train.output=runs"]
    line = run_job_line("train", [*base, f"--data.dataset={tmp_path}", "--data.image_size=64",
                                  "--model.head=classification"], capsys)
    assert "may not change" in line and "data.dataset=" in line and "data.image_size=64 (was 32)" in line
    assert "model.head=classification (was regression)" in line
    line = run_job_line("train", [*base, "--train.epochs=1"], capsys)
    assert "train.epochs=1 (was 2)" in line and "may only grow" in line
    # the same refusal when the config is built in code rather than by the command line
    with pytest.raises(ConfigError, match=r"optim.lr=0.5 \(was 0.001\)"):
        train(parse_args(run_args(p60, tmp_path / "runs", "r", 3, "--optim.lr=0.5", "--resume")))
    assert files() == before  # nothing written
    assert not (tmp_path / "data").exists()
    line = run_job_line("train", ["--resume", "--train.name=never", "--train.output=runs"], capsys)
    assert "holds no run to resume" in line


def retrained_on(p60: Path, tmp_path: Path, prepared_with: dict) -> tuple[Path, Path]:
    """(a copy of p60 whose manifest says how it was prepared, a one-epoch run trained on it)."""
    data = tmp_path / "data"
    shutil.copytree(p60, data)
    manifest = json.loads((data / "manifest.json").read_text())
    (data / "manifest.json").write_text(json.dumps({**manifest, "config": prepared_with}))
    train(parse_args(run_args(data, tmp_path / "runs", "m", 1)))
    return data, tmp_path / "runs" / "m"


def test_issue26_predict_preprocesses_as_the_checkpoint_was_trained(p60, tmp_path, capsys):
    """The dataset is prepared again (Ben Graham, another size) after training: the model keeps the
    preprocessing it was trained with; a resume of its run refuses the changed data."""
    from aptos_ray.train.checkpoint import prepare_config

    trained = {**vars(PrepareConfig()), "image_size": 64, "ben_graham": False}
    data, run = retrained_on(p60, tmp_path, trained)
    manifest = json.loads((data / "manifest.json").read_text())
    again = {**trained, "image_size": 128, "ben_graham": True}
    (data / "manifest.json").write_text(json.dumps({**manifest, "config": again}))
    prepare, source = prepare_config(read_checkpoint(str(run)))
    assert (prepare.image_size, prepare.ben_graham, source) == (64, False, "the checkpoint")
    again_line = r"prepared again since the run.s checkpoints were trained \(.*prepare.image_size: 64 -> 128"
    with pytest.raises(ConfigError, match=again_line):
        train(parse_args(run_args(data, tmp_path / "runs", "m", 2, "--resume")))


def test_issue26_old_checkpoint_without_preprocessing_falls_back_with_a_note(p60, two_epochs, tmp_path, capsys):
    from aptos_ray.train.checkpoint import prepare_config

    data = tmp_path / "data"
    shutil.copytree(p60, data)
    manifest = json.loads((data / "manifest.json").read_text())
    (data / "manifest.json").write_text(json.dumps({**manifest, "config": {"image_size": 64, "ben_graham": True}}))
    checkpoint = read_checkpoint(str(two_epochs))
    checkpoint.preprocessing = None  # as saved before checkpoints carried it
    checkpoint.config.data.dataset = str(data)
    prepare, source = prepare_config(checkpoint)
    assert (prepare.image_size, prepare.ben_graham, source) == (64, True, f"{data}/manifest.json")
    note = capsys.readouterr().err.strip()
    assert "\n" not in note and note.startswith("note: ")
    assert "predates checkpoints that carry their preprocessing" in note


def test_issue26_mixed_head_ensemble_is_refused_before_ray(two_epochs, tmp_path, monkeypatch):
    import torch

    from aptos_ray.infer import predict as predict_module

    looks = {**vars(PrepareConfig()), "image_size": 64}
    members = {}
    for name, head in (("a", "regression"), ("b", "classification")):
        members[name] = tmp_path / name
        shutil.copytree(two_epochs / "checkpoint_epoch_0001", members[name])
        state = torch.load(members[name] / "model.pt", weights_only=True)
        state["config"]["model"]["head"], state["preprocessing"] = head, looks
        torch.save(state, members[name] / "model.pt")

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(predict_module, "init_ray", no_ray)
    cfg = parse_args([f"--predict.checkpoint={members['a']},{members['b']}", f"--predict.images={two_epochs}",
                      f"--predict.output={tmp_path / 'out'}"])
    with pytest.raises(ConfigError, match="the ensemble mixes heads") as e:
        predict_module.predict(cfg)
    assert "\n" not in str(e.value) and "regression head" in str(e.value) and "classification head" in str(e.value)
    # members trained on other preprocessing cannot share the photographs the driver prepares once
    state["config"]["model"]["head"], state["preprocessing"] = "regression", {**looks, "ben_graham": True}
    torch.save(state, members["b"] / "model.pt")
    with pytest.raises(ConfigError, match="preprocessed differently"):
        predict_module.predict(cfg)


def test_issue26_resume_of_a_planted_or_broken_config_is_one_line(tmp_path, monkeypatch, capsys):
    """A run's config.yaml is read back with the config loader: a bomb or junk there is one line."""
    monkeypatch.chdir(tmp_path)
    levels = (f"&{n} [{','.join([f'*{p}'] * 9)}]" for p, n in zip("abcde", "bcdef"))
    bomb = ", ".join(["&a [x,x,x,x,x,x,x,x,x]", *levels])
    for name, text in (("bomb", f"tune:\n  space: [{bomb}]\n"), ("junk", "train: [unclosed\n"), ("list", "- 1\n")):
        (tmp_path / "runs" / name).mkdir(parents=True)
        (tmp_path / "runs" / name / "config.yaml").write_text(text)
        line = run_job_line("train", ["--resume", f"--train.name={name}"], capsys)
        assert f"runs/{name}/config.yaml cannot be read back" in line and len(line) < 300
    assert not (tmp_path / "data").exists()
