"""The local fallback: the same ``loop.fit`` in this process, on one GPU or the CPU, no Ray."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import torch
from tqdm import tqdm

from aptos_ray import storage
from aptos_ray.config import Config
from aptos_ray.loop import load_checkpoint_state

TRAIN_COLUMNS = ["id", "grade", "image", "height", "width"]
CHECKPOINT_DIR = re.compile(r"checkpoint_epoch_(\d+)$")


def read_split(dataset: str, split: str, columns: list[str] = TRAIN_COLUMNS) -> pa.Table:
    """One split of a prepared dataset as an Arrow table (local path or URI)."""
    fs, inner = storage.filesystem(storage.join(dataset, split))
    if fs.get_file_info(inner).type.name == "NotFound":
        return pa.table({c: pa.array([], type=pa.string()) for c in columns})
    return pads.dataset(inner, filesystem=fs, format="parquet").to_table(columns=columns)


def table_batches(table: pa.Table, batch_size: int, order: np.ndarray | None = None) -> Iterator[dict]:
    """Numpy row batches, like Ray Data's ``iter_batches(batch_format="numpy")``."""
    if order is None:
        order = np.arange(table.num_rows)
    for start in range(0, len(order), batch_size):
        chunk = table.take(pa.array(order[start : start + batch_size]))
        yield {name: np.asarray(chunk.column(name).to_pylist(), dtype=object if name in ("id", "image") else None)
               for name in chunk.column_names}


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
        self.train_table = read_split(cfg.data.dataset, "train")
        self.val_table = read_split(cfg.data.dataset, "val")

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(self.device)

    def train_rows(self, epoch: int) -> Iterator[dict]:
        order = np.random.default_rng([self.cfg.train.seed, epoch]).permutation(self.train_table.num_rows)
        return table_batches(self.train_table, self.cfg.data.read_batch_size, order)

    def val_rows(self) -> Iterator[dict]:
        return table_batches(self.val_table, self.cfg.data.read_batch_size)

    def checkpoints(self) -> dict[int, Path]:
        found = {}
        for path in Path(self.run_dir).glob("checkpoint_epoch_*"):
            match = CHECKPOINT_DIR.search(path.name)
            if match and (path / "model.pt").is_file():
                found[int(match.group(1))] = path
        return found

    def restored_state(self) -> dict | None:
        found = self.checkpoints()
        return load_checkpoint_state(found[max(found)]) if self.resume and found else None

    def report(self, metrics: dict, checkpoint_dir: Path | None, epoch: int) -> None:
        if checkpoint_dir is None:
            return
        target = Path(self.run_dir) / f"checkpoint_epoch_{epoch:04d}"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(checkpoint_dir, target)
        (target / "metrics.json").write_text(json.dumps(metrics))
        self._prune()

    def _prune(self) -> None:
        """Keep the best ``keep_checkpoints`` by validation QWK and the latest, as Ray does."""
        found = self.checkpoints()
        scores = {e: json.loads((p / "metrics.json").read_text())["val_qwk"] for e, p in found.items()}
        keep = set(sorted(scores, key=lambda e: (scores[e], e), reverse=True)[: self.cfg.train.keep_checkpoints])
        keep.add(max(found))
        for epoch, path in found.items():
            if epoch not in keep:
                shutil.rmtree(path, ignore_errors=True)
