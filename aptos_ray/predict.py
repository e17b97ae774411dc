"""Batch inference: a checkpoint + images -> submission.csv, predictions.parquet, unreadable.csv.

    find_inputs (driver: ids, labels if known, paths; problems found here are "unreadable")
      raw files  -> ray.data.from_items -> map_batches(load_rows)        (Ray tasks: decode + the
                                                                          training prepare steps)
      prepared   -> ray.data.read_parquet(<dataset>/<split>)              (already preprocessed)
      -> map_batches(GradePredictor, compute=ActorPoolStrategy(size=n))   (Ray actors: the model is
                                                                          loaded once per actor)
      -> driver: rows sorted back into input order -> files (+ report.py when labels are known)

Every input ends up either predicted or in ``unreadable.csv`` with its id and the reason, so
``num_inputs == num_predicted + num_unreadable`` always holds. The model call itself is plain
PyTorch (``Grader``), shared with the single-process benchmark and the export parity check.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from aptos_ray import storage
from aptos_ray.config import Config, ConfigError, PrepareConfig, config_from_dict
from aptos_ray.engine import GradeTransforms, autocast
from aptos_ray.errors import MissingFileError
from aptos_ray.loop import CHECKPOINT_FILE
from aptos_ray.models import create_model, grades_from_outputs, model_data_config, scores_from_outputs
from aptos_ray.preprocess import ImageError, preprocess
from aptos_ray.records import MANIFEST, SPLITS, decode_batch, encode_image
from aptos_ray.sources import ID_COLUMNS, IMAGE_EXTENSIONS, LABEL_COLUMNS, parse_grade, read_image, resolve_image

NUM_GRADES = 5
PROB_COLUMNS = [f"prob_{g}" for g in range(NUM_GRADES)]
PREPARED_COLUMNS = ["id", "grade", "image", "height", "width"]
UNREADABLE_COLUMNS = ["id", "source", "reason"]
SHOW_UNREADABLE = 50  # printed lines; the CSV always has all of them


# --------------------------------------------------------------------------- checkpoints


def _file_type(path: str) -> str:
    """'File', 'Directory' or 'NotFound' for a local path or URI."""
    fs, inner = storage.filesystem(path)
    return fs.get_file_info(inner).type.name


def resolve_checkpoint(path: str) -> str:
    """``model.pt`` of a run directory (its best checkpoint), a checkpoint directory, or the file
    itself; a local path (made absolute: actors run elsewhere) or a URI (Ray runs may write there)."""
    if not path:
        raise ConfigError("set --predict.checkpoint to a run directory, a checkpoint directory or a model.pt")
    path = storage.absolute(path)
    kind = _file_type(path)
    if kind == "File":
        return path
    if kind == "NotFound":
        raise MissingFileError(f"{path}: checkpoint not found (expected a run directory, checkpoint directory or model.pt)")
    if _file_type(storage.join(path, CHECKPOINT_FILE)) == "File":
        return storage.join(path, CHECKPOINT_FILE)
    summary = storage.join(path, "summary.json")
    if _file_type(summary) == "File":
        best = json.loads(storage.read_text(summary))["best_checkpoint"]
        # summary.json holds absolute paths: a run directory that was moved still has the folder
        moved = storage.join(path, best.rstrip("/").rsplit("/", 1)[-1], CHECKPOINT_FILE)
        for candidate in (storage.join(best, CHECKPOINT_FILE), moved):
            if _file_type(candidate) == "File":
                return candidate
        raise MissingFileError(f"{summary}: best checkpoint {best} has no {CHECKPOINT_FILE} (pruned or moved?)")
    raise MissingFileError(
        f"{path}: no {CHECKPOINT_FILE} and no summary.json: not a checkpoint directory, nor a finished run "
        f"(for an unfinished run, pass one of its checkpoint_epoch_NNNN folders)"
    )


@dataclass
class Checkpoint:
    """What inference needs from a checkpoint, without the optimizer state."""

    path: str
    config: Config
    state_dict: dict
    cut_points: list[float] | None
    epoch: int
    metrics: dict


def read_checkpoint(path: str) -> Checkpoint:
    model_pt = resolve_checkpoint(path)
    with storage.open_input(model_pt) as f:
        data = f.read()
    try:  # weights_only: a checkpoint is data, never code to run
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConfigError(f"{model_pt}: cannot read the checkpoint ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise ConfigError(f"{model_pt}: not a training checkpoint (expected keys 'model' and 'config')")
    return Checkpoint(model_pt, config_from_dict(state["config"]), state["model"], state.get("cut_points"),
                      int(state.get("epoch", -1)), state.get("metrics") or {})


def prepare_config(cfg: Config) -> tuple[PrepareConfig, str]:
    """How the training images were preprocessed -> (config, where it came from).

    The training dataset's manifest is the truth (its ``config`` is the prepare section that made
    it); the checkpoint's own ``prepare`` section is only right when training prepared its data.
    """
    try:
        from aptos_ray.records import read_manifest

        saved = read_manifest(cfg.data.dataset).get("config")
    except (FileNotFoundError, OSError, ValueError):
        saved = None
    if isinstance(saved, dict):
        known = {f.name for f in fields(PrepareConfig)}
        return PrepareConfig(**{k: v for k, v in saved.items() if k in known}), f"{cfg.data.dataset}/{MANIFEST}"
    return cfg.prepare, "the checkpoint's prepare section"


# --------------------------------------------------------------------------- the model call (plain PyTorch)

# Extra views for test-time augmentation: fundus photographs have no canonical orientation, so the
# flips (and then the rest of the square's symmetries) show the model the same eye again.
TTA_VIEWS = (
    lambda x: x.flip(3),  # horizontal flip
    lambda x: x.flip(2),  # vertical flip
    lambda x: x.flip(2).flip(3),  # both = rotation by 180
    lambda x: x.transpose(2, 3),
    lambda x: x.transpose(2, 3).flip(3),  # rotation by 90
    lambda x: x.transpose(2, 3).flip(2),  # rotation by 270
    lambda x: x.flip(2).flip(3).transpose(2, 3),
)


def check_tta(tta: int) -> None:
    if not 0 <= tta <= len(TTA_VIEWS):
        raise ConfigError(f"predict.tta must be 0..{len(TTA_VIEWS)} (extra flipped/rotated views), got {tta}")


class Grader:
    """A checkpoint's model with its transforms: uint8 NHWC images -> grades, scores, probabilities."""

    def __init__(self, checkpoint: Checkpoint, device: torch.device | str = "cpu", tta: int = 0):
        check_tta(tta)
        cfg = checkpoint.config
        self.device = torch.device(device)
        self.head = cfg.model.head
        self.cut_points = checkpoint.cut_points
        self.tta = tta
        self.amp = cfg.train.amp and self.device.type == "cuda"  # as validation ran in training
        model = create_model(cfg.model, load_pretrained=False)
        model.load_state_dict(checkpoint.state_dict)
        self.model = model.to(self.device).eval()
        data = model_data_config(model)
        self.size = cfg.data.image_size or data["input_size"][-1]
        self.mean, self.std = data["mean"], data["std"]
        self.transforms = GradeTransforms(self.size, self.mean, self.std, augment=False)

    @torch.no_grad()
    def outputs(self, images: np.ndarray) -> torch.Tensor:
        """Model outputs (float32, CPU) for uint8 (N, H, W, 3); TTA views combined.

        Without TTA these are the raw outputs, exactly what validation decoded in training. With
        TTA, classification averages the views' probabilities (returned as log-probabilities, so
        the usual decoding applies) and regression averages the scores.
        """
        x = self.transforms.eval(images).to(self.device)
        views = [x] + [view(x) for view in TTA_VIEWS[: self.tta]]
        outs = []
        for v in views:
            with autocast(self.device, self.amp):
                outs.append(self.model(v).float().cpu())
        if len(outs) == 1:
            return outs[0]
        if self.head == "classification":
            return torch.stack([o.softmax(dim=1) for o in outs]).mean(0).log()
        return torch.stack(outs).mean(0)

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """{predicted, score, p_referable, prob_0..4} for uint8 (N, H, W, 3)."""
        out = self.outputs(images)
        result = {
            "predicted": grades_from_outputs(out, self.head, self.cut_points).numpy().astype(np.int64),
            "score": scores_from_outputs(out, self.head).numpy().astype(np.float64),
        }
        if self.head == "classification":
            probs = out.softmax(dim=1).numpy().astype(np.float64)
            result["p_referable"] = probs[:, 2:].sum(axis=1)  # P(grade >= 2): referable DR
            result.update({c: probs[:, g] for g, c in enumerate(PROB_COLUMNS)})
        return result


# --------------------------------------------------------------------------- inputs


@dataclass
class Inputs:
    """What ``predict.images`` holds: raw files to read (``items``) or a prepared split."""

    kind: str  # csv | folder | prepared
    path: str
    items: list[dict] = field(default_factory=list)  # raw: {order, id, grade, source}
    unreadable: list[dict] = field(default_factory=list)  # {id, source, reason}, found before decoding
    dataset: str = ""  # prepared
    split: str = ""
    encoding: str = "raw"
    num_rows: int = 0  # prepared: rows of the split
    prepared_with: dict | None = None  # prepared: the manifest's prepare config
    notes: list[str] = field(default_factory=list)

    @property
    def num_inputs(self) -> int:
        return (self.num_rows if self.kind == "prepared" else len(self.items)) + len(self.unreadable)


def find_inputs(images: str, split: str = "test") -> Inputs:
    """Work out which of the three layouts ``images`` is and list its inputs."""
    if not images:
        raise ConfigError("set --predict.images to a raw layout (CSV + image folder), an image folder or a prepared dataset")
    if storage.exists(storage.join(images, MANIFEST)):
        return prepared_inputs(images, split)
    if storage.is_uri(images):
        raise ConfigError(f"{images}: predict reads raw images from local folders; URIs work for prepared datasets only")
    path = Path(images)
    if not path.exists():
        raise MissingFileError(f"{images}: not found (--predict.images)")
    if path.is_file():
        if path.suffix.lower() != ".csv":
            raise ConfigError(f"{images}: expected a folder, a CSV of ids or a prepared dataset")
        return csv_inputs(path, images_dir_for(path))
    csv = pick_csv(path, split)
    if csv is not None:
        return csv_inputs(csv, images_dir_for(csv))
    return folder_inputs(path)


def prepared_inputs(dataset: str, split: str) -> Inputs:
    from aptos_ray.local import read_split
    from aptos_ray.records import read_manifest

    if split not in SPLITS:
        raise ConfigError(f"predict.split must be one of {', '.join(SPLITS)}, got '{split}'")
    manifest = read_manifest(dataset)
    counts = manifest.get("counts", {}).get(split)
    num_rows = sum(int(n) for n in counts.values()) if counts else read_split(dataset, split, ["id"]).num_rows
    if num_rows == 0:
        raise ConfigError(f"{dataset}: split '{split}' is empty; choose another --predict.split")
    return Inputs("prepared", dataset, dataset=storage.absolute(dataset), split=split,
                  encoding=manifest.get("encoding", "raw"), num_rows=num_rows, prepared_with=manifest.get("config"))


# What decides how a prepared image looks; the split and quality settings do not.
LOOK_KEYS = ("crop_border", "circle_mask", "ben_graham", "ben_graham_sigma", "image_size")


def preprocessing_differences(prepared_with: dict | None, training: PrepareConfig) -> list[str]:
    """Settings in which a prepared dataset differs from the training data (empty when unknown)."""
    if not isinstance(prepared_with, dict):
        return []
    trained = asdict(training)
    return [f"{k}={prepared_with[k]} (training: {trained[k]})" for k in LOOK_KEYS
            if k in prepared_with and prepared_with[k] != trained[k]]


def pick_csv(folder: Path, split: str) -> Path | None:
    """The ids CSV of a raw folder: ``<split>.csv`` (Kaggle: test.csv), else the only one there."""
    if (folder / f"{split}.csv").is_file():
        return folder / f"{split}.csv"
    csvs = sorted(p for p in folder.glob("*.csv") if not p.name.startswith("sample_submission"))
    if len(csvs) > 1:
        raise ConfigError(f"{folder}: several CSV files ({', '.join(p.name for p in csvs)}); pass one as --predict.images")
    return csvs[0] if csvs else None


def images_dir_for(csv: Path) -> Path:
    """Kaggle puts test.csv beside test_images/ and train.csv beside train_images/; also images/."""
    for name in (f"{csv.stem}_images", "images"):
        if (csv.parent / name).is_dir():
            return csv.parent / name
    others = sorted(p for p in csv.parent.glob("*_images") if p.is_dir())
    if len(others) == 1:
        return others[0]
    raise ConfigError(f"{csv}: no image folder beside it ({csv.stem}_images/ or images/)")


def csv_inputs(csv: Path, images: Path) -> Inputs:
    """A CSV of ids, labels optional (Kaggle test.csv has only ``id_code``)."""
    try:
        table = pd.read_csv(csv, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as e:
        raise ConfigError(f"{csv}: cannot read the ids CSV ({e})") from None
    columns = {c.strip().lower(): c for c in table.columns}
    id_col = next((columns[c] for c in ID_COLUMNS if c in columns), None)
    if id_col is None:
        raise ConfigError(f"{csv}: no id column (expected one of {', '.join(ID_COLUMNS)}; found {', '.join(table.columns)})")
    label_col = next((columns[c] for c in LABEL_COLUMNS if c in columns), None)
    images = images.resolve()
    listing = {e.name: e.name for e in os.scandir(images) if e.is_file()}
    inputs = Inputs("csv", str(csv), notes=[f"ids from {csv}, images from {images}"])
    first_line: dict[str, int] = {}
    bad_labels = 0
    labels = table[label_col] if label_col else [None] * len(table)
    for line, (raw_id, label) in enumerate(zip(table[id_col], labels), start=2):  # line 1: header
        id_ = str(raw_id).strip()
        source = str(images / id_) if id_ else f"{csv}:line {line}"
        if id_ in first_line:
            reason = f"duplicate id: first on line {first_line[id_]}"
            inputs.unreadable.append({"id": id_, "source": source, "reason": reason})
            continue
        first_line[id_] = line
        grade, reason = parse_grade(label) if label_col else (None, "")
        bad_labels += bool(reason) and reason != "missing grade"
        path, reason = resolve_image(images, id_, listing)
        if reason:
            inputs.unreadable.append({"id": id_, "source": source, "reason": reason})
            continue
        inputs.items.append({"order": len(first_line), "id": id_, "grade": -1 if grade is None else grade,
                             "source": str(path)})
    if bad_labels:
        inputs.notes.append(f"{bad_labels} rows of {csv.name} have an unusable grade: predicted as unlabelled")
    return inputs


def folder_inputs(folder: Path) -> Inputs:
    """Every file of a folder (no labels); files that are not images are reported, not skipped."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    inputs = Inputs("folder", str(folder))
    for i, p in enumerate(files):
        if p.suffix.lower() in IMAGE_EXTENSIONS:
            inputs.items.append({"order": i, "id": p.stem, "grade": -1, "source": str(p.resolve())})
        else:
            reason = f"not an image file: {p.suffix or 'no extension'}"
            inputs.unreadable.append({"id": p.stem, "source": str(p), "reason": reason})
    if not inputs.items:
        sub = [d.name for d in folder.iterdir() if d.is_dir()][:5]
        hint = f" (it has folders {', '.join(sub)}: class folders are read by prepare.py)" if sub else ""
        raise ConfigError(f"{folder}: no images (.png/.jpg/.jpeg) and no ids CSV{hint}")
    seen: dict[str, str] = {}
    for item in list(inputs.items):  # a.png and a.jpg would give one id twice
        if item["id"] in seen:
            inputs.items.remove(item)
            reason = f"duplicate id: also {seen[item['id']]}"
            inputs.unreadable.append({"id": item["id"], "source": item["source"], "reason": reason})
        seen.setdefault(item["id"], item["source"])
    return inputs


# --------------------------------------------------------------------------- Ray Data stages


def load_rows(batch: dict, prepare: dict) -> dict:
    """Ray task: read and preprocess raw image files exactly as ``prepare`` did for training.

    A file that cannot be used keeps its row, with ``reason`` set and no image.
    """
    cfg = PrepareConfig(**prepare)
    images, heights, widths, reasons = [], [], [], []
    for source in batch["source"]:
        try:
            arr = preprocess(read_image({"source": str(source)}, cfg.min_image_side), cfg)
            data, reason = encode_image(arr, "raw"), ""
        except ImageError as e:
            arr, data, reason = None, b"", e.reason
        except Exception as e:  # one odd file must not stop the job: report it with the error
            arr, data, reason = None, b"", f"unreadable image: {type(e).__name__}: {e}"
        images.append(data)
        heights.append(0 if arr is None else arr.shape[0])
        widths.append(0 if arr is None else arr.shape[1])
        reasons.append(reason)
    return {**batch, "image": np.array(images, dtype=object), "height": np.array(heights, dtype=np.int32),
            "width": np.array(widths, dtype=np.int32), "reason": np.array(reasons, dtype=object)}


class GradePredictor:
    """Ray Data actor: loads the checkpoint once, then grades batches of preprocessed rows."""

    def __init__(self, checkpoint_path: str, tta: int, encoding: str):
        device = "cuda" if torch.cuda.is_available() else "cpu"  # Ray sets CUDA_VISIBLE_DEVICES per actor
        self.grader = Grader(read_checkpoint(checkpoint_path), device, tta)
        self.encoding = encoding
        probs = ["p_referable", *PROB_COLUMNS] if self.grader.head == "classification" else []
        self.float_columns = ["score", *probs]

    def __call__(self, batch: dict) -> dict:
        n = len(batch["id"])
        reasons = batch.get("reason", np.full(n, "", dtype=object))
        ok = np.array([not r for r in reasons], dtype=bool)
        out = {k: v for k, v in batch.items() if k != "image"}
        out["reason"] = reasons
        if ok.any():
            good = {k: batch[k][ok] for k in ("image", "height", "width")}
            graded = self.grader(decode_batch(good, self.encoding))
        else:
            graded = {}
        out["predicted"] = _fill(n, ok, graded.get("predicted"), -1, np.int64)
        for name in self.float_columns:
            out[name] = _fill(n, ok, graded.get(name), np.nan, np.float64)
        return out


def _fill(n: int, ok: np.ndarray, values, missing, dtype) -> np.ndarray:
    full = np.full(n, missing, dtype=dtype)
    if values is not None:
        full[ok] = values
    return full


def actor_resources(num_actors: int) -> tuple[int, dict]:
    """(pool size, per-actor resources): one GPU per actor where the cluster has GPUs."""
    import ray

    gpus = int(ray.cluster_resources().get("GPU", 0))
    if gpus:
        return max(1, min(num_actors, gpus)), {"num_gpus": 1, "num_cpus": 1}
    # CPU-only: the actors must leave one whole CPU free, because every read, repartition and
    # preprocessing task asks for one. With 2 actors x 1 CPU on a 2-core machine the pipeline
    # waited forever for it ("Active & requested resources: 2.5/2 CPU"). Fractional actors still
    # get a torch thread each, so the cores are used all the same.
    cpus = float(ray.cluster_resources().get("CPU", 1))
    size = max(1, min(num_actors, int(cpus)))
    return size, {"num_cpus": round(max(0.0, min(1.0, (cpus - 1) / size)), 3)}


def build_dataset(inputs: Inputs, checkpoint: Checkpoint, prepare: PrepareConfig, tta: int, batch_size: int,
                  num_actors: int):
    """The Ray Data pipeline that yields one prediction row per readable or unreadable input row."""
    import ray

    if inputs.kind == "prepared":
        ds = ray.data.read_parquet(storage.join(inputs.dataset, inputs.split), columns=PREPARED_COLUMNS)
        encoding = inputs.encoding
    else:
        ds = ray.data.from_items(inputs.items, override_num_blocks=max(1, math.ceil(len(inputs.items) / batch_size)))
        ds = ds.map_batches(load_rows, batch_size=batch_size, batch_format="numpy",
                            fn_kwargs={"prepare": asdict(prepare)})
        encoding = "raw"
    # One block goes to one actor: blocks no larger than a batch spread the work over the pool.
    ds = ds.repartition(target_num_rows_per_block=batch_size)
    # No more actors than batches: each one costs a process and a model load.
    num_rows = inputs.num_rows if inputs.kind == "prepared" else len(inputs.items)
    size, resources = actor_resources(min(num_actors, math.ceil(num_rows / batch_size)))
    return ds.map_batches(
        GradePredictor,
        fn_constructor_kwargs={"checkpoint_path": checkpoint.path, "tta": tta, "encoding": encoding},
        compute=ray.data.ActorPoolStrategy(size=size),
        batch_size=batch_size,
        batch_format="numpy",
        **resources,
    )


@contextlib.contextmanager
def ray_progress_off():
    """One tqdm bar counting images instead of Ray's operator progress (which a Dataset copies
    from the DataContext when it is built, so this wraps building and running)."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    old = ctx.enable_progress_bars
    ctx.enable_progress_bars = False
    try:
        yield
    finally:
        ctx.enable_progress_bars = old


def collect(ds, total: int) -> pd.DataFrame:
    """Every output row of the pipeline, on the driver (via Arrow: plain numpy dtypes in pandas)."""
    from tqdm import tqdm

    tables = []
    with tqdm(total=total, unit="img", desc="predict", file=sys.stderr) as bar:
        for table in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            tables.append(table)
            bar.update(table.num_rows)
    return pa.concat_tables(tables, promote_options="default").to_pandas() if tables else pd.DataFrame()


# --------------------------------------------------------------------------- the job


def predict(cfg: Config) -> dict:
    """Predict ``cfg.predict.images`` with ``cfg.predict.checkpoint``; returns the summary (predict.json)."""
    p = cfg.predict
    if p.batch_size < 1 or p.num_actors < 1:
        raise ConfigError(f"predict.batch_size and predict.num_actors must be >= 1, got {p.batch_size}, {p.num_actors}")
    check_tta(p.tta)
    checkpoint = read_checkpoint(p.checkpoint)
    inputs = find_inputs(p.images, p.split)
    if inputs.kind != "prepared" and not inputs.items:
        reasons = sorted({u["reason"].split(":")[0] for u in inputs.unreadable})
        raise ConfigError(f"{inputs.path}: none of its {inputs.num_inputs} inputs can be read ({', '.join(reasons)})")
    prepare, prepare_from = prepare_config(checkpoint.config)
    print(f"checkpoint: {checkpoint.path} (epoch {checkpoint.epoch}, {checkpoint.config.model.name}, "
          f"{checkpoint.config.model.head} head)")
    print(f"inputs: {inputs.kind} {inputs.path}: {inputs.num_inputs} images"
          + (f", split {inputs.split}" if inputs.kind == "prepared" else f"; preprocessing from {prepare_from}"))
    for note in inputs.notes:
        print(f"note: {note}")
    differences = preprocessing_differences(inputs.prepared_with, prepare) if inputs.kind == "prepared" else []
    if differences:
        print(f"warning: {inputs.path} was prepared differently from the training data ({prepare_from}): "
              f"{', '.join(differences)}; predictions may be off", file=sys.stderr)

    from aptos_ray.ray_setup import init_ray

    init_ray(cfg.scaling)
    started = time.perf_counter()
    with ray_progress_off():
        ds = build_dataset(inputs, checkpoint, prepare, p.tta, p.batch_size, p.num_actors)
        rows = collect(ds, inputs.num_inputs - len(inputs.unreadable))
    seconds = time.perf_counter() - started
    predictions, unreadable = split_results(rows, inputs)
    summary = write_outputs(p.output, predictions, unreadable, {
        "checkpoint": checkpoint.path, "epoch": checkpoint.epoch, "model": checkpoint.config.model.name,
        "head": checkpoint.config.model.head, "cut_points": checkpoint.cut_points, "tta": p.tta,
        "input": {"kind": inputs.kind, "path": inputs.path, "split": inputs.split or None},
        "preprocessing": None if inputs.kind == "prepared" else {"from": prepare_from, **asdict(prepare)},
        "num_inputs": inputs.num_inputs, "seconds": round(seconds, 2),
        "images_per_s": round(len(predictions) / max(seconds, 1e-9), 2),
        "checkpoint_val_metrics": {k: v for k, v in checkpoint.metrics.items() if k.startswith("val_") and k != "val_confusion"},
    })
    print_summary(summary, unreadable, p.output)
    if summary["num_labelled"]:
        from aptos_ray.report import write_report

        metrics = write_report(p.output, predictions, summary)
        print(f"report: {storage.join(p.output, 'report.html')} (QWK {metrics['qwk']:.4f} on {metrics['n']} labelled images)")
    return summary


def split_results(rows: pd.DataFrame, inputs: Inputs) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(predictions in input order, unreadable rows: found on the driver + failed to decode)."""
    if rows.empty:
        rows = pd.DataFrame({"id": [], "reason": []})
    failed = rows[rows["reason"].astype(str) != ""]
    unreadable = pd.concat([pd.DataFrame(inputs.unreadable, columns=UNREADABLE_COLUMNS),
                            failed.reindex(columns=UNREADABLE_COLUMNS).fillna("")], ignore_index=True)
    good = rows[rows["reason"].astype(str) == ""]
    order = ["order"] if "order" in good else ["id"]  # prepared splits have no input order: by id
    good = good.sort_values(order, kind="stable").reset_index(drop=True)
    keep = ["id", "grade", "predicted", "score", *[c for c in ("p_referable", *PROB_COLUMNS) if c in good], *(
        ["source"] if "source" in good else [])]
    predictions = good[keep].copy()
    predictions["id"] = predictions["id"].astype(str)
    predictions["grade"] = predictions["grade"].astype(np.int64)
    predictions["predicted"] = predictions["predicted"].astype(np.int64)
    return predictions, unreadable.astype(str)


def write_outputs(output: str, predictions: pd.DataFrame, unreadable: pd.DataFrame, meta: dict) -> dict:
    """submission.csv, predictions.parquet, unreadable.csv, predict.json; returns the summary."""
    if len(predictions) + len(unreadable) != meta["num_inputs"]:  # a bug, never a data problem
        raise RuntimeError(f"predict lost rows: {meta['num_inputs']} inputs != {len(predictions)} predicted "
                           f"+ {len(unreadable)} unreadable")
    submission = pd.DataFrame({"id_code": predictions["id"], "diagnosis": predictions["predicted"]})
    storage.write_text(storage.join(output, "submission.csv"), submission.to_csv(index=False))
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(predictions, preserve_index=False), buf)
    storage.write_bytes(storage.join(output, "predictions.parquet"), buf.getvalue())
    storage.write_text(storage.join(output, "unreadable.csv"), unreadable.to_csv(index=False))
    remove_stale_report(output)
    summary = {
        **meta,
        "num_predicted": int(len(predictions)),
        "num_unreadable": int(len(unreadable)),
        "num_labelled": int((predictions["grade"] >= 0).sum()),
        "predicted_grade_counts": {str(g): int((predictions["predicted"] == g).sum()) for g in range(NUM_GRADES)},
    }
    storage.write_text(storage.join(output, "predict.json"), json.dumps(summary, indent=2))
    return summary


def remove_stale_report(output: str) -> None:
    """A report left by an earlier run in the same folder must not pass for this run's."""
    from aptos_ray.report import FIGURES, REPORT_FILES

    for name in (*REPORT_FILES, *FIGURES.values()):
        fs, inner = storage.filesystem(storage.join(output, name))
        if fs.get_file_info(inner).type.name == "File":
            fs.delete_file(inner)


def print_summary(summary: dict, unreadable: pd.DataFrame, output: str) -> None:
    print(f"predicted {summary['num_predicted']} of {summary['num_inputs']} images in {summary['seconds']:.1f}s "
          f"({summary['images_per_s']:.1f} img/s); grades {summary['predicted_grade_counts']}")
    if len(unreadable):
        print(f"{len(unreadable)} unreadable inputs (not predicted, listed in {storage.join(output, 'unreadable.csv')}):")
        for row in unreadable.head(SHOW_UNREADABLE).itertuples():
            print(f"  {row.id}: {row.reason}")
        if len(unreadable) > SHOW_UNREADABLE:
            print(f"  ... and {len(unreadable) - SHOW_UNREADABLE} more")
    print(f"wrote {storage.join(output, 'submission.csv')} and predictions.parquet")


def read_predictions(output: str) -> pd.DataFrame:
    """``predictions.parquet`` of a predict output folder."""
    path = storage.join(output, "predictions.parquet")
    try:
        with storage.open_input(path) as f:
            return pq.read_table(pa.BufferReader(f.read())).to_pandas()
    except FileNotFoundError:
        raise MissingFileError(
            f"{path}: not found; run `python jobs/predict.py --predict.output={output} ...` first"
        ) from None
