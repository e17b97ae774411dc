"""Weighted resampling of the rare grades, on a stream of row batches.

Ray Data has no WeightedRandomSampler, and a driver-side list of every index would not scale
to a cluster. Instead each row is repeated k ~ Poisson(rate[grade]) times, with k drawn from a
generator seeded by (seed, epoch, row id): reproducible whatever order or worker the row
arrives on, different every epoch, and the expected epoch size equals the number of rows.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Iterator

import numpy as np

def grade_weights(counts: dict[int, int], mode: str) -> dict[int, float]:
    """Relative per-sample weight of each grade: 1, 1/n (the seed's sampler) or 1/sqrt(n)."""
    weights = {}
    for grade, n in counts.items():
        if n <= 0:
            continue
        weights[grade] = {"none": 1.0, "inverse": 1.0 / n, "sqrt": 1.0 / np.sqrt(n)}[mode]
    return weights


def repeat_rates(counts: dict[int, int], mode: str) -> dict[int, float]:
    """Expected copies of a row per epoch, per grade, so that an epoch keeps its size."""
    weights = grade_weights(counts, mode)
    total = sum(counts[g] for g in weights)
    mass = sum(counts[g] * w for g, w in weights.items())
    return {g: w * total / mass for g, w in weights.items()}


def _row_key(row_id) -> int:
    return zlib.crc32(str(row_id).encode())


def repeat_counts(ids, grades, rates: dict[int, float], seed: int, epoch: int) -> np.ndarray:
    """Copies of each row this epoch; depends only on (seed, epoch, id, grade)."""
    return np.array(
        [
            np.random.default_rng([seed, epoch, _row_key(i)]).poisson(rates.get(int(g), 0.0))
            for i, g in zip(ids, grades)
        ],
        dtype=np.int64,
    )


def resample_batches(
    batches: Iterable[dict], rates: dict[int, float], seed: int, epoch: int
) -> Iterator[dict]:
    """Repeat the rows of each numpy batch by their Poisson counts; drop batches left empty."""
    for batch in batches:
        counts = repeat_counts(batch["id"], batch["grade"], rates, seed, epoch)
        index = np.repeat(np.arange(len(counts)), counts)
        if len(index):
            yield {k: np.asarray(v)[index] for k, v in batch.items()}
