"""K-fold cross-validation folds of a prepared dataset (``data.folds``, ``data.fold``, ``data.fold_seed``).

With ``data.folds = K >= 2`` the prepared splits are pooled (train, val and test: every image is
validated once across the K runs) and each image gets one fold: stratified by grade, a near-duplicate
group (``dup_group``) always in one fold, seeded. Fold ``data.fold`` validates, the other K-1 train.
The assignment is a pure function of (ids, grades, groups, K, seed), recomputed wherever it is needed
(the training driver, each backend, the CV job), so nothing is written into the prepared dataset.

scikit-learn's ``StratifiedGroupKFold`` does the assignment: it balances the grade distribution of
the folds while keeping each group whole; rows are sorted by id first, so the folds do not depend on
the order in which Parquet files are listed.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from aptos_ray.data.format import SPLITS, TRAIN_COLUMNS, read_split
from aptos_ray.errors import DataError

FOLD_COLUMNS = ["id", "grade", "dup_group"]  # what the assignment reads: no image bytes


def assign_folds(grades: np.ndarray, groups: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """One fold (0..folds-1) per row: stratified by grade, rows of one group (>= 0) in one fold.

    ``groups``: near-duplicate group per row, -1 for a row without one (its own group).
    """
    from sklearn.model_selection import StratifiedGroupKFold

    grades, groups = np.asarray(grades, dtype=np.int64), np.asarray(groups, dtype=np.int64)
    n = len(grades)
    # a row without a group is a group of its own: numbers after the largest real group id
    own = np.arange(n) + (groups.max(initial=-1) + 1)
    units = np.where(groups >= 0, groups, own)
    if len(np.unique(units)) < folds:
        raise DataError(f"data.folds={folds} needs at least {folds} images (near-duplicate groups count once), "
                        f"the dataset has {len(np.unique(units))}")
    out = np.full(n, -1, dtype=np.int64)
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    for fold, (_, val) in enumerate(splitter.split(np.zeros(n), grades, units)):
        out[val] = fold
    return out


def pooled_rows(dataset: str, columns: list[str] = FOLD_COLUMNS, ids: list[str] | None = None) -> pa.Table:
    """Every split of the prepared dataset in one table, sorted by id (only ``ids`` when given)."""
    tables = [read_split(dataset, split, columns, ids) for split in SPLITS]
    tables = [t for t in tables if t.num_rows]
    if not tables:
        raise DataError(f"{dataset}: no rows in any split")
    table = pa.concat_tables(tables, promote_options="default")
    return table.take(pc.sort_indices(table, sort_keys=[("id", "ascending")]))


def fold_table(dataset: str, folds: int, seed: int) -> pa.Table:
    """``id, grade, dup_group, fold`` for every image of the dataset, sorted by id."""
    table = pooled_rows(dataset)
    groups = table.column("dup_group").to_numpy(zero_copy_only=False) if "dup_group" in table.column_names \
        else np.full(table.num_rows, -1)
    fold = assign_folds(table.column("grade").to_numpy(zero_copy_only=False), groups, folds, seed)
    return table.append_column("fold", pa.array(fold, pa.int64()))


def fold_ids(dataset: str, folds: int, fold: int, seed: int) -> tuple[list[str], list[str]]:
    """(training ids, validation ids) of fold ``fold``."""
    if not 0 <= fold < folds:
        raise DataError(f"data.fold must be 0..{folds - 1} with data.folds={folds}, got {fold}")
    table = fold_table(dataset, folds, seed)
    ids = table.column("id").to_pylist()
    is_val = table.column("fold").to_numpy() == fold
    return [i for i, v in zip(ids, is_val) if not v], [i for i, v in zip(ids, is_val) if v]


def fold_counts(dataset: str, folds: int, fold: int, seed: int) -> tuple[dict[int, int], int]:
    """(training grade counts, number of validation images) of fold ``fold``."""
    table = fold_table(dataset, folds, seed)
    train = table.filter(pc.not_equal(table.column("fold"), fold))
    grades = train.column("grade").to_numpy(zero_copy_only=False).astype(np.int64)
    counts = {int(g): int(n) for g, n in zip(*np.unique(grades, return_counts=True))}
    return counts, table.num_rows - train.num_rows


def training_tables(data) -> tuple[pa.Table, pa.Table]:
    """(train, val) Arrow tables for ``data`` (the DataConfig): the prepared splits, or with
    ``data.folds`` the pooled rows outside / inside fold ``data.fold``."""
    if not data.folds:
        return read_split(data.dataset, "train"), read_split(data.dataset, "val")
    train_ids, val_ids = fold_ids(data.dataset, data.folds, data.fold, data.fold_seed)
    return pooled_rows(data.dataset, TRAIN_COLUMNS, train_ids), pooled_rows(data.dataset, TRAIN_COLUMNS, val_ids)


def keep_ids(batch: dict, ids: frozenset) -> dict:
    """Ray Data ``map_batches`` filter: the rows of ``batch`` whose id is in ``ids``."""
    keep = np.array([str(i) in ids for i in batch["id"]], dtype=bool)
    return {k: np.asarray(v)[keep] for k, v in batch.items()}


def with_folds(batch: dict, fold_of: dict) -> dict:
    """Ray Data ``map_batches``: ``batch`` with each row's ``fold`` (``fold_of``: id -> fold)."""
    return {**batch, "fold": np.array([fold_of[str(i)] for i in batch["id"]], dtype=np.int64)}
