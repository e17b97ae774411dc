"""Small prepared datasets written directly (no Ray), for fast tests of training and prediction."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from aptos_ray.data.format import SCHEMA, encode_image

# The tiny model every training test starts from: timm's test_efficientnet (builds in milliseconds),
# random init, 32 px, batches of 8; a test appends what it changes (a later --key=value wins).
TINY = ["--model.name=test_efficientnet", "--model.pretrained=none", "--model.head=classification",
        "--data.image_size=32", "--train.batch_size=8", "--train.eval_batch_size=32", "--train.progress=false",
        "--optim.warmup_epochs=0"]


def tiny_model(**changes):
    """The model section of ``TINY``, for tests that build a model without a config."""
    from aptos_ray.config import ModelConfig

    return ModelConfig(**{"name": "test_efficientnet", "pretrained": "none", "head": "classification", **changes})


def write_split(out: Path, split: str, ids, grades, images) -> None:
    n = len(ids)
    table = pa.table(
        {
            "id": list(ids),
            "grade": pa.array(grades, pa.int8()),
            "split": [split] * n,
            "image": [encode_image(im) for im in images],
            "height": pa.array([im.shape[0] for im in images], pa.int32()),
            "width": pa.array([im.shape[1] for im in images], pa.int32()),
            "orig_height": pa.array([im.shape[0] for im in images], pa.int32()),
            "orig_width": pa.array([im.shape[1] for im in images], pa.int32()),
            "source": list(ids),
            "phash": ["0" * 16] * n,
            "dup_group": pa.array([-1] * n, pa.int32()),
        },
        schema=SCHEMA,
    )
    (out / split).mkdir(parents=True, exist_ok=True)
    pq.write_table(table, out / split / "part-0.parquet")


def aptos_subset(aptos_dir: Path, out: Path, per_grade: int = 24, size: int = 32, val_share: float = 0.34,
                 seed: int = 0) -> Path:
    """A stratified subset of the shared APTOS folder, resized to ``size``, as a prepared dataset."""
    labels = pd.read_csv(aptos_dir / "labels.csv")
    rng = np.random.default_rng(seed)
    counts = {}
    splits = {"train": ([], [], []), "val": ([], [], [])}
    for grade, group in labels.groupby("diagnosis"):
        chosen = group.sample(min(per_grade, len(group)), random_state=seed)
        n_val = int(round(len(chosen) * val_share))
        for i, row in enumerate(chosen.itertuples()):
            split = "val" if i < n_val else "train"
            image = Image.open(aptos_dir / "images" / f"{row.id_code}.png").convert("RGB").resize((size, size))
            ids, grades, images = splits[split]
            ids.append(row.id_code)
            grades.append(int(grade))
            images.append(np.asarray(image))
            counts.setdefault(split, {}).setdefault(str(grade), 0)
            counts[split][str(grade)] += 1
    for split, (ids, grades, images) in splits.items():
        order = rng.permutation(len(ids))
        write_split(out, split, [ids[i] for i in order], [grades[i] for i in order], [images[i] for i in order])
    return write_manifest(out, size, counts)


def write_manifest(out: Path, size: int, counts: dict) -> Path:
    """The manifest a test dataset needs: encoding, size and grade counts per split."""
    manifest = {"format_version": 1, "encoding": "raw", "image_size": size, "counts": counts,
                "num_inputs": sum(sum(c.values()) for c in counts.values())}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


FAIL_AT_EPOCH = 1


def failing_worker(loop_config: dict) -> None:
    """Ray Train's worker function, except that rank 0 dies (``os._exit``) on the first batch of
    epoch ``FAIL_AT_EPOCH``, once per run: the marker file stops it dying again after the restart.
    Test-only fault injection, swapped in for ``ray_backend.train_worker`` by a test."""
    from aptos_ray.config import config_from_dict
    from aptos_ray.train.loop import DatasetInfo, fit
    from aptos_ray.train.ray_backend import RayBackend

    from aptos_ray import storage

    cfg = config_from_dict(loop_config["config"])
    backend = RayBackend(cfg)
    marker = storage.join(cfg.train.output, cfg.train.name, ".failure_injected")  # a path or URI
    rows = backend.train_rows

    def dying_rows(epoch: int):
        for batch in rows(epoch):
            if epoch == FAIL_AT_EPOCH and backend.rank == 0 and not storage.exists(marker):
                storage.write_text(marker, f"killed in epoch {epoch}\n")
                os._exit(1)
            yield batch

    backend.train_rows = dying_rows
    fit(cfg, backend, DatasetInfo(**loop_config["info"]))


def synthetic_subset(out: Path, size: int, per_grade: int = 8, val_per_grade: int = 4, copies: int = 1) -> Path:
    """A prepared dataset of synthetic fundus photos (aptos_ray.synthetic) at ``size`` px, no shared data
    needed (GPU machines, benchmarks). ``copies`` repeats every training row: more steps, same drawing cost."""
    from aptos_ray.data.synthetic import render_fundus

    counts = {"train": {str(g): per_grade * copies for g in range(5)}, "val": {str(g): val_per_grade for g in range(5)}}
    for split, n in (("train", per_grade), ("val", val_per_grade)):
        rows = [(g, i) for g in range(5) for i in range(n)]
        images = [render_fundus(g, np.random.default_rng([split == "val", g, i]), size) for g, i in rows]
        repeat = copies if split == "train" else 1
        ids = [f"{split}-{g}-{i}-{c}" for c in range(repeat) for g, i in rows]
        write_split(out, split, ids, [g for _ in range(repeat) for g, _ in rows], images * repeat)
    return write_manifest(out, size, counts)


KILL_AFTER_REPORT_OF_EPOCH = 1


def killed_after_report_worker(loop_config: dict) -> None:
    """Ray Train's worker function, except that rank 0 is SIGKILLed right after ``ray.train.report``
    of epoch ``KILL_AFTER_REPORT_OF_EPOCH`` returns (once per run), before the controller has
    polled the report; every rank-0 epoch start is appended to ``.epochs_started``.
    Test-only fault injection, swapped in for ``ray_backend.train_worker`` by a test."""
    import signal

    from aptos_ray.config import config_from_dict
    from aptos_ray.train.loop import DatasetInfo, fit
    from aptos_ray.train.ray_backend import RayBackend

    cfg = config_from_dict(loop_config["config"])
    backend = RayBackend(cfg)
    run_dir = Path(cfg.train.output) / cfg.train.name
    marker, started = run_dir / ".killed_after_report", run_dir / ".epochs_started"
    rows, report = backend.train_rows, backend.report

    def logged_rows(epoch: int):
        if backend.rank == 0:
            with open(started, "a") as f:
                f.write(f"{epoch}\n")
        return rows(epoch)

    def report_then_die(metrics, checkpoint_dir, epoch):
        report(metrics, checkpoint_dir, epoch)
        if epoch == KILL_AFTER_REPORT_OF_EPOCH and backend.rank == 0 and not marker.exists():
            marker.write_text(f"{os.getpid()}\n")
            os.kill(os.getpid(), signal.SIGKILL)

    backend.train_rows, backend.report = logged_rows, report_then_die
    fit(cfg, backend, DatasetInfo(**loop_config["info"]))


def user_error_worker(loop_config: dict) -> None:
    """A worker whose config is wrong in a way only the worker finds: counts its attempts, then
    raises a ``ConfigError`` (a ``UserError``) as create_model does for an unknown model."""
    from aptos_ray.config import config_from_dict
    from aptos_ray.errors import ConfigError

    cfg = config_from_dict(loop_config["config"])
    with open(Path(cfg.train.output) / f".attempts-{os.getpid()}", "w") as f:
        f.write("1\n")
    raise ConfigError("model.name: unknown timm model 'no_such_net' (found in the worker)")


def val_ids_worker(loop_config: dict) -> None:
    """A Ray Train worker that only lists the validation ids its rank scores (``RayBackend.val_rows``),
    into ``<train.output>/val_ids-<rank>.json``; swapped in for ``ray_backend.train_worker`` by a test."""
    from aptos_ray.config import config_from_dict
    from aptos_ray.train.ray_backend import RayBackend

    cfg = config_from_dict(loop_config["config"])
    backend = RayBackend(cfg)
    ids = [str(i) for batch in backend.val_rows() for i in batch["id"]]
    (Path(cfg.train.output) / f"val_ids-{backend.rank}.json").write_text(json.dumps(ids))
