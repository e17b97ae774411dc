"""Checkpoints for inference: find ``model.pt`` from a run, checkpoint folder or file, and read it.

A checkpoint is data, never code: it is read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import io
import json
import sys
from dataclasses import dataclass, fields

import torch

from aptos_ray import storage
from aptos_ray.config import Config, ConfigError, PrepareConfig, config_from_dict
from aptos_ray.data.format import MANIFEST, read_manifest
from aptos_ray.errors import CorruptCheckpointError, MissingFileError
from aptos_ray.train.checkpoint import CHECKPOINT_FILE, NOT_A_CHECKPOINT


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
    preprocessing: dict | None = None  # the training images' prepare settings (None: saved before they were kept)


def read_checkpoint(path: str) -> Checkpoint:
    model_pt = resolve_checkpoint(path)
    with storage.open_input(model_pt) as f:
        data = f.read()
    try:  # weights_only: a checkpoint is data, never code to run
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception:  # truncated, not a zip, pickled code: torch's text says nothing more useful
        raise CorruptCheckpointError(f"{model_pt}: {NOT_A_CHECKPOINT}") from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise CorruptCheckpointError(f"{model_pt}: {NOT_A_CHECKPOINT}")
    try:
        cfg = config_from_dict(state["config"])
    except ConfigError as e:
        raise CorruptCheckpointError(f"{model_pt}: its config does not fit this version ({e})") from None
    preprocessing = state.get("preprocessing")
    return Checkpoint(model_pt, cfg, state["model"], state.get("cut_points"), int(state.get("epoch", -1)),
                      state.get("metrics") or {}, preprocessing if isinstance(preprocessing, dict) else None)


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
        saved = read_manifest(cfg.data.dataset).get("config")
    except (FileNotFoundError, OSError, ValueError):
        saved = None
    if isinstance(saved, dict):
        source = f"{cfg.data.dataset}/{MANIFEST}"
        print(f"note: {checkpoint.path} predates checkpoints that carry their preprocessing: taking it from "
              f"{source} as it is now (retrain, or keep that dataset as it was)", file=sys.stderr)
        return PrepareConfig(**{k: v for k, v in saved.items() if k in known}), source
    return cfg.prepare, "the checkpoint's prepare section"
