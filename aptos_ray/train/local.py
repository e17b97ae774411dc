"""The local fallback: the same ``loop.fit`` in this process, on one GPU or the CPU, no Ray."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from aptos_ray import storage
from aptos_ray.config import Config
from aptos_ray.data.folds import training_tables
from aptos_ray.data.format import table_batches
from aptos_ray.train.checkpoint import (
    Checkpoint,
    CorruptCheckpointError,
    best_key,
    checkpoint_folders,
    checkpoint_name,
    read_checkpoint,
    read_history,
)


class LocalBackend:
    """Data from Parquet via pyarrow, checkpoints kept in the run directory like Ray keeps them."""

    rank = 0
    world_size = 1
    progress_bar = tqdm

    def __init__(self, cfg: Config, run_dir: str, resume: bool):
        if storage.is_uri(run_dir):
            raise ValueError(f"--local writes to local disk; train.output={cfg.train.output} is a URI: run with Ray")
        self.cfg = cfg
        self.run_dir = run_dir
        self.resume = resume
        self.device = torch.device("cuda" if cfg.scaling.use_gpu and torch.cuda.is_available() else "cpu")
        # Scores of the kept checkpoints, for pruning (a resumed run starts with those it kept).
        self.scores = {h["epoch"]: h for h in self._kept_history()}
        self.train_table, self.val_table = training_tables(cfg.data)  # the prepared splits, or a fold's

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(self.device)

    def train_rows(self, epoch: int) -> Iterator[dict]:
        order = np.random.default_rng([self.cfg.train.seed, epoch]).permutation(self.train_table.num_rows)
        return table_batches(self.train_table, self.cfg.data.read_batch_size, order)

    def val_rows(self) -> Iterator[dict]:
        return table_batches(self.val_table, self.cfg.data.read_batch_size)

    def restored_state(self) -> Checkpoint | None:
        """The latest checkpoint that loads; one that does not is reported and the one before tried."""
        if not self.resume:
            return None
        for epoch, folder in sorted(checkpoint_folders(self.run_dir).items(), reverse=True):
            try:
                return read_checkpoint(folder, resume=True)
            except CorruptCheckpointError as e:
                print(f"warning: skipping the checkpoint of epoch {epoch}: {e}", file=sys.stderr)
        return None

    def report(self, metrics: dict, checkpoint_dir: Path | None, epoch: int) -> None:
        """Keep the checkpoint as Ray Train would: copied aside, renamed into place, then pruned."""
        if checkpoint_dir is None:
            return
        target = Path(self.run_dir) / checkpoint_name(epoch)
        aside = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        storage.remove_dead_leftovers(target)  # the aside folder of a killed run that wrote this epoch
        shutil.rmtree(aside, ignore_errors=True)
        try:
            with storage.named(str(target)):
                shutil.copytree(checkpoint_dir, aside)
        except Exception:  # a full disk leaves no half copy behind, not even a hidden one (a kill's the next run removes)
            shutil.rmtree(aside, ignore_errors=True)
            raise
        shutil.rmtree(target, ignore_errors=True)
        aside.rename(target)  # a kill before this line leaves only a hidden folder, never a half checkpoint
        self.scores[epoch] = metrics
        self._prune(epoch)

    def _prune(self, latest: int) -> None:
        """Keep the best ``keep_checkpoints`` by ``best_key`` and the latest, the rule Ray Train applies.

        Written here because Ray Train's checkpoint manager only runs inside a Ray Train run.
        """
        found = checkpoint_folders(self.run_dir)
        ranked = sorted((e for e in found if e in self.scores), key=lambda e: best_key(self.scores[e]), reverse=True)
        keep = set(ranked[: max(self.cfg.train.keep_checkpoints, 1)]) | {latest}
        for epoch, path in found.items():
            if epoch not in keep:
                shutil.rmtree(path, ignore_errors=True)

    def _kept_history(self) -> list[dict]:
        found = checkpoint_folders(self.run_dir) if self.resume else {}
        if not found:
            return []
        try:
            return [h for h in read_history(found[max(found)]) if h["epoch"] in found]
        except (OSError, ValueError):
            return []
