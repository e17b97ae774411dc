"""A run directory: its checkpoints, its record, and the files the driver writes from the record.

    <train.output>/<train.name>/
        config.yaml                     the driver, at start
        checkpoint_epoch_NNNN/          one per reported epoch, the best ``train.keep_checkpoints``
            model.pt                    (by validation QWK) and the latest kept: Ray Train's storage
            config.yaml                 in Ray runs, the local backend in --local runs (written aside
            history.json                and renamed into place), the same files either way
        checkpoint_manager_snapshot.json  Ray runs: Ray Train's own record of the kept checkpoints
        metrics.jsonl, summary.json, plots/   the driver (train, or tune for its trials), after fit

One owner per file. The workers write nothing but checkpoints, and every checkpoint carries the
history of every epoch up to its own (``history.json``), so a run's record is simply its latest
registered checkpoint: Ray Train's ``Result`` names it in Ray runs, the checkpoint folders in local
runs. Nothing is rewritten afterwards, and a resumed run continues the history it restored.

Training (a resume), predict, export, ensembles and cross-validation read a checkpoint the same way:
``read_checkpoint``, into one ``Checkpoint``. A checkpoint is data, never code: ``model.pt`` is read
with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import io
import json
import math
import re
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path

import pyarrow.fs as pafs
import torch

from aptos_ray import figures, storage
from aptos_ray.config import Config, ConfigError, PrepareConfig, config_from_dict
from aptos_ray.data.embedded import dataset_preprocessing
from aptos_ray.data.format import MANIFEST, read_manifest
from aptos_ray.errors import CorruptCheckpointError, MissingFileError

CHECKPOINT_FILE = "model.pt"
HISTORY_FILE = "history.json"
CHECKPOINT_DIR = re.compile(r"checkpoint_epoch_(\d+)$")
NOT_A_CHECKPOINT = "not a valid checkpoint (truncated or not a training checkpoint)"
# What must match between a checkpoint and the config that loads its weights.
MODEL_KEYS = ("name", "head")


def checkpoint_name(epoch: int) -> str:
    return f"checkpoint_epoch_{epoch:04d}"


def best_key(metrics: dict) -> tuple:
    """The one rule for "best": highest validation QWK, NaN lowest, and of equal scores the later
    epoch, as Ray Train's checkpoint manager orders them (it keeps what this calls best)."""
    qwk = metrics.get("val_qwk", float("nan"))
    valid = qwk is not None and not math.isnan(qwk)
    return (valid, qwk if valid else 0.0, metrics.get("epoch", -1))


def best_of(history: list[dict]) -> dict:
    return max(history, key=best_key)


# --- checkpoints -------------------------------------------------------------------------------


def save_checkpoint(directory: Path, state: dict, cfg: Config, history: list[dict]) -> Path:
    """model.pt (loadable with ``torch.load(weights_only=True)``), config.yaml and history.json."""
    with storage.named(str(directory)):  # a full or read-only disk: one line naming the folder
        directory.mkdir(parents=True, exist_ok=True)
        # Serialised in memory, then written: torch.save reports a full disk as a RuntimeError
        # ("unexpected pos ..."), a plain write as the OSError it is.
        buffer = io.BytesIO()
        torch.save(state, buffer)
        (directory / CHECKPOINT_FILE).write_bytes(buffer.getbuffer())
        cfg.save(directory / "config.yaml")
        (directory / HISTORY_FILE).write_text(json.dumps(history))
    return directory


@dataclass
class Checkpoint:
    """A checkpoint as read from its model.pt: what inference needs and, when read for a resume,
    the optimizer, schedule and loss-scaler states and the history of every epoch up to its own."""

    path: str  # its model.pt
    config: Config
    state_dict: dict
    cut_points: list[float] | None
    epoch: int
    metrics: dict
    preprocessing: dict | None = None  # the training images' prepare settings (None: saved before they were kept)
    history: list[dict] = field(default_factory=list)
    optimizer: dict | None = None
    scheduler: dict | None = None
    scaler: dict | None = None


def resolve_checkpoint(path: str) -> str:
    """``model.pt`` of a run directory (its best checkpoint), a checkpoint directory, or the file
    itself; a local path (made absolute: actors run elsewhere) or a URI (Ray runs may write there)."""
    if not path:
        raise ConfigError("set --predict.checkpoint to a run directory, a checkpoint directory or a model.pt")
    path = storage.absolute(path)
    kind = storage.file_type(path)
    if kind == "File":
        return path
    if kind == "NotFound":
        raise MissingFileError(f"{path}: checkpoint not found (expected a run directory, checkpoint directory or model.pt)")
    if storage.file_type(storage.join(path, CHECKPOINT_FILE)) == "File":
        return storage.join(path, CHECKPOINT_FILE)
    summary = storage.join(path, "summary.json")
    if storage.file_type(summary) == "File":
        best = json.loads(storage.read_text(summary))["best_checkpoint"]
        # summary.json holds absolute paths: a run directory that was moved still has the folder
        moved = storage.join(path, storage.name(best), CHECKPOINT_FILE)
        for candidate in (storage.join(best, CHECKPOINT_FILE), moved):
            if storage.file_type(candidate) == "File":
                return candidate
        raise MissingFileError(f"{summary}: best checkpoint {best} has no {CHECKPOINT_FILE} (pruned or moved?)")
    raise MissingFileError(
        f"{path}: no {CHECKPOINT_FILE} and no summary.json: not a checkpoint directory, nor a finished run "
        f"(for an unfinished run, pass one of its checkpoint_epoch_NNNN folders)"
    )


def read_checkpoint(path: str | Path, resume: bool = False) -> Checkpoint:
    """The checkpoint of a run directory, checkpoint folder or model.pt (``resolve_checkpoint``), local
    or URI; with ``resume`` also its training state and history. One that does not load is a
    ``CorruptCheckpointError`` naming the file: a resume then takes the checkpoint before."""
    model_pt = resolve_checkpoint(str(path))
    with storage.open_input(model_pt) as f:
        data = f.read()
    try:  # weights_only: a checkpoint is data, never code to run
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception:  # truncated, zero bytes, not a zip, pickled code: all unusable alike
        raise CorruptCheckpointError(f"{model_pt}: {NOT_A_CHECKPOINT}") from None
    needed = ("model", "config", *(("optimizer", "scheduler") if resume else ()))
    if not isinstance(state, dict) or not all(k in state for k in needed):
        raise CorruptCheckpointError(f"{model_pt}: {NOT_A_CHECKPOINT}")
    try:
        cfg = config_from_dict(state["config"])
    except ConfigError as e:
        raise CorruptCheckpointError(f"{model_pt}: its config does not fit this version ({e})") from None
    preprocessing = state.get("preprocessing")
    checkpoint = Checkpoint(model_pt, cfg, state["model"], state.get("cut_points"), int(state.get("epoch", -1)),
                            state.get("metrics") or {}, preprocessing if isinstance(preprocessing, dict) else None)
    if resume:
        checkpoint.history = _history_beside(model_pt)
        checkpoint.optimizer, checkpoint.scheduler = state["optimizer"], state["scheduler"]
        checkpoint.scaler = state.get("scaler")
    return checkpoint


def _history_beside(model_pt: str) -> list[dict]:
    history = storage.join(storage.parent(model_pt), HISTORY_FILE)
    if storage.file_type(history) != "File":
        return []
    try:
        return json.loads(storage.read_text(history))
    except (OSError, ValueError):  # cut short by a kill during the upload
        raise CorruptCheckpointError(f"{history}: {NOT_A_CHECKPOINT}") from None


def prepare_config(checkpoint: Checkpoint) -> tuple[PrepareConfig, str]:
    """How the model's training images were preprocessed -> (config, where it came from).

    The checkpoint carries it (``preprocessing``: its training dataset's manifest settings when it
    trained), so a dataset prepared again later, with other settings, changes nothing. A checkpoint
    saved before checkpoints carried it falls back, with a note, to the training dataset's manifest
    as it is now, then to the checkpoint's ``prepare`` section.
    """
    known = {f.name for f in fields(PrepareConfig)}
    if checkpoint.preprocessing is not None:
        return PrepareConfig(**{k: v for k, v in checkpoint.preprocessing.items() if k in known}), "the checkpoint"
    cfg = checkpoint.config
    try:
        saved = dataset_preprocessing(read_manifest(cfg.data.dataset))
    except (FileNotFoundError, OSError, ValueError):
        saved = None
    if saved is not None:
        source = f"{cfg.data.dataset}/{MANIFEST}"
        print(f"note: {checkpoint.path} predates checkpoints that carry their preprocessing: taking it from "
              f"{source} as it is now (retrain, or keep that dataset as it was)", file=sys.stderr)
        return PrepareConfig(**saved), source
    return cfg.prepare, "the checkpoint's prepare section"


def model_mismatch(saved: Config, cfg: Config) -> str:
    """What differs between a checkpoint's model section and ``cfg.model`` ("" when they fit)."""
    differs = [f"model.{k}: checkpoint {getattr(saved.model, k)!r}, config {getattr(cfg.model, k)!r}"
               for k in MODEL_KEYS if getattr(saved.model, k) != getattr(cfg.model, k)]
    return "; ".join(differs)


def load_weights(model: torch.nn.Module, checkpoint: Checkpoint, cfg: Config) -> None:
    """``model.load_state_dict`` with one line naming the checkpoint and what differs, instead of
    torch's list of every missing and unexpected key (hundreds of lines)."""
    where = checkpoint.path
    differs = model_mismatch(checkpoint.config, cfg)
    if differs:
        raise CorruptCheckpointError(f"{where}: the checkpoint's model differs from the config ({differs})")
    try:
        model.load_state_dict(checkpoint.state_dict)
    except RuntimeError as e:
        first = str(e).split("\n\t", 2)[:2]  # "Error(s) in loading state_dict for X:" + the first problem
        raise CorruptCheckpointError(f"{where}: the checkpoint's weights do not fit model {cfg.model.name} "
                                     f"({' '.join(t.strip() for t in first)[:300]})") from None


def read_history(checkpoint_dir: str) -> list[dict]:
    return json.loads(storage.read_text(storage.join(checkpoint_dir, HISTORY_FILE)))


def checkpoint_folders(run_dir: str) -> dict[int, str]:
    """{epoch: folder} of the complete checkpoints in a local run directory (model.pt and history)."""
    found = {}
    for path in Path(run_dir).glob("checkpoint_epoch_*"):
        match = CHECKPOINT_DIR.fullmatch(path.name)
        if match and (path / CHECKPOINT_FILE).is_file() and (path / HISTORY_FILE).is_file():
            found[int(match.group(1))] = str(path)
    return found


def stored_checkpoints(run_dir: str) -> dict[int, str]:
    """{epoch: folder} of the checkpoint folders with a model.pt and a history in a run directory,
    a local path or URI: what the workers uploaded, registered by Ray Train or not."""
    fs, root = storage.filesystem(run_dir)
    found = {}
    for info in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True)):
        match = CHECKPOINT_DIR.fullmatch(info.base_name)
        if match and info.type == pafs.FileType.Directory:
            files = fs.get_file_info([f"{info.path}/{CHECKPOINT_FILE}", f"{info.path}/{HISTORY_FILE}"])
            if all(f.type == pafs.FileType.File for f in files):
                found[int(match.group(1))] = storage.join(run_dir, info.base_name)
    return found


def latest_preprocessing(run_dir: str) -> dict | None:
    """The preprocessing the newest stored checkpoint of a run was trained on; None when it does not
    say (saved before checkpoints carried it) or does not load (a resume skips it anyway)."""
    stored = stored_checkpoints(run_dir)
    if not stored:
        return None
    try:
        return read_checkpoint(stored[max(stored)]).preprocessing
    except Exception:  # truncated or not a checkpoint: the loop warns and takes the one before
        return None


# --- the record and the driver's files ------------------------------------------------------------


@dataclass
class RunRecord:
    """What a run has to show: the history of its epochs and its kept checkpoints by epoch."""

    run_dir: str
    history: list[dict]
    checkpoints: dict[int, str]

    @property
    def best(self) -> dict:
        return best_of(self.history)

    def best_checkpoint(self) -> str:
        """The best epoch's checkpoint; it is always kept, since pruning ranks by the same rule."""
        epoch = self.best["epoch"]
        if epoch not in self.checkpoints:
            raise MissingFileError(f"{self.run_dir}: the best epoch {epoch} has no kept checkpoint")
        return self.checkpoints[epoch]


def record_from_result(result, run_dir: str) -> RunRecord:
    """The record of a Ray Train run, from its ``Result``: kept checkpoints and the latest one's history."""
    if result.checkpoint is None:
        return RunRecord(run_dir, [], {})
    kept = {int(metrics["epoch"]): storage.join(run_dir, Path(checkpoint.path).name)
            for checkpoint, metrics in result.best_checkpoints}
    latest = storage.join(run_dir, Path(result.checkpoint.path).name)
    kept[int(result.metrics["epoch"])] = latest
    # A checkpoint uploaded whose report Ray Train never registered (a worker killed right after
    # reporting; a restart resumed from it, see RayBackend.restored_state) is in the history too.
    for epoch, folder in stored_checkpoints(run_dir).items():
        kept.setdefault(epoch, folder)
    return RunRecord(run_dir, read_history(latest), kept)


def record_from_folders(run_dir: str) -> RunRecord:
    """The record of a local run: its complete checkpoint folders and the latest one's history."""
    kept = checkpoint_folders(run_dir)
    history = read_history(kept[max(kept)]) if kept else []
    return RunRecord(run_dir, history, kept)


def write_run_files(record: RunRecord, seconds: float) -> dict:
    """metrics.jsonl, plots/ and summary.json of a run, from its record; returns the summary."""
    if not record.history:
        raise RuntimeError(f"{record.run_dir}: no epoch finished")
    run_dir, history, best, last = record.run_dir, record.history, record.best, record.history[-1]
    storage.write_text(storage.join(run_dir, "metrics.jsonl"), "".join(json.dumps(h) + "\n" for h in history))
    plots = {"learning_curves.png": figures.learning_curves(history)}
    if "val_confusion" in best:
        plots["confusion_best.png"] = figures.confusion_matrix(best["val_confusion"],
                                                               f"Validation, best epoch {best['epoch']}")
    for name, figure in plots.items():
        storage.write_bytes(storage.join(run_dir, "plots", name), figures.png(figure))
    summary = {
        "run_dir": run_dir,
        "epochs": len(history),
        "best_epoch": best["epoch"],
        "best_val_qwk": best["val_qwk"],
        "best_val_acc": best["val_acc"],
        "best_val_kappa": best["val_kappa"],
        "best_checkpoint": record.best_checkpoint(),
        "last_checkpoint": record.checkpoints.get(last["epoch"], ""),
        "last_val_qwk": last["val_qwk"],
        "wall_seconds": round(seconds, 1),
    }
    storage.write_text(storage.join(run_dir, "summary.json"), json.dumps(summary, indent=2))
    return summary


def summary_text(s: dict) -> str:
    return (
        f"\nDone: {s['epochs']} epochs in {s['wall_seconds']:.0f}s\n"
        f"  best validation QWK {s['best_val_qwk']:.4f} (acc {s['best_val_acc']:.3f}, "
        f"kappa {s['best_val_kappa']:.3f}) at epoch {s['best_epoch']}\n"
        f"  best checkpoint: {s['best_checkpoint']}\n"
        f"  plots: {storage.join(s['run_dir'], 'plots')}\n"
    )
