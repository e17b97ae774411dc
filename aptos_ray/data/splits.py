"""Seeded, stratified train/val/test splits that keep near-duplicate photographs together.

Near-duplicates (the same eye photographed twice, re-encoded copies) are found by the Hamming
distance of 256-bit perceptual hashes and grouped (union-find); a group is one unit of the split,
so no copy of a validation image trains the model.
"""

from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np

from aptos_ray.data.format import GRADES, SPLITS


def phash_array(hexes: list[str]) -> np.ndarray:
    """Hex hashes -> (n, words) uint64, 16 hex digits per word."""
    words = max(1, len(hexes[0]) // 16) if hexes else 1
    return np.array(
        [[int(h[k * 16:(k + 1) * 16], 16) for k in range(words)] for h in hexes], dtype=np.uint64
    ).reshape(len(hexes), words)


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise Hamming distances between (m, words) and (n, words) uint64 hashes -> (m, n)."""
    return sum(np.bitwise_count(a[:, None, k] ^ b[None, :, k]).astype(np.int32) for k in range(a.shape[1]))


def near_duplicate_groups(hashes: np.ndarray, max_distance: int) -> list[list[int]]:
    """Groups (index lists, size >= 2, sorted) of hashes linked by Hamming distance <= max_distance.

    All pairs are compared: n^2/2 XOR + popcount of 64-bit words in numpy (~1 s for 10k images
    of 256-bit hashes, tens of seconds at 50k). That is exact and simpler than a BK-tree or
    multi-index hashing, which only pay off at millions. Pairs are linked transitively (union-find).
    """
    hashes = hashes.reshape(len(hashes), -1)
    n = len(hashes)
    if n < 2 or max_distance < 0:
        return []
    uf = _UnionFind(n)
    block = max(1, (1 << 22) // (n * hashes.shape[1]))  # rows per block: <= 4M word comparisons at once
    for start in range(0, n, block):
        stop = min(n, start + block)
        rows, cols = np.nonzero(hamming(hashes[start:stop], hashes[start:]) <= max_distance)
        for i, j in zip(rows + start, cols + start):
            if i < j:
                uf.union(int(i), int(j))
    members = defaultdict(list)
    for i in range(n):
        members[uf.find(i)].append(i)
    return sorted((m for m in members.values() if len(m) > 1), key=lambda m: m[0])


class _UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]  # path halving
            i = self.parent[i]
        return i

    def union(self, i: int, j: int) -> None:
        ri, rj = self.find(i), self.find(j)
        if ri != rj:
            self.parent[max(ri, rj)] = min(ri, rj)


def assign_splits(grades: np.ndarray, given: list[str | None], groups: list[list[int]],
                  val_fraction: float, test_fraction: float, seed: int) -> tuple[list[str], list[list[int]]]:
    """One split per row -> (splits, groups the input itself spread over several splits).

    Given splits are honoured. A near-duplicate group is one unit: rows of a group without a
    given split follow the group's (most common) given split, and groups with none are split
    together, stratified by the group's most common grade, so a duplicate never straddles splits.
    """
    n = len(grades)
    group_of = np.arange(n)
    for members in groups:
        group_of[members] = members[0]
    units = defaultdict(list)
    for i in range(n):
        units[int(group_of[i])].append(i)
    splits: list[str | None] = list(given)
    cross, free = [], []
    for members in units.values():
        named = [given[i] for i in members if given[i]]
        if named:
            common = Counter(named).most_common()
            target = sorted(common, key=lambda kv: (-kv[1], SPLITS.index(kv[0])))[0][0]
            for i in members:
                splits[i] = splits[i] or target
            if len(set(named)) > 1:
                cross.append(members)
        else:
            free.append(members)
    labels = np.array([_unit_grade(grades[m]) for m in free], dtype=int)
    for members, split in zip(free, split_units(labels, val_fraction, test_fraction, seed)):
        for i in members:
            splits[i] = split
    return splits, cross


def _unit_grade(grades: np.ndarray) -> int:
    counts = np.bincount(grades, minlength=len(GRADES))
    return int(np.flatnonzero(counts == counts.max())[-1])  # ties -> the higher, rarer grade


def split_units(labels: np.ndarray, val_fraction: float, test_fraction: float, seed: int) -> list[str]:
    """Seeded split of units stratified by label: test first, then val out of the rest."""
    out = np.array(["train"] * len(labels), dtype=object)
    rest = np.arange(len(labels))
    if test_fraction > 0:
        rest, test = _stratified_take(rest, labels, test_fraction, seed)
        out[test] = "test"
    if val_fraction > 0:
        rest, val = _stratified_take(rest, labels, val_fraction / (1 - test_fraction), seed + 1)
        out[val] = "val"
    return list(out)


def _stratified_take(idx: np.ndarray, labels: np.ndarray, fraction: float, seed: int,
                     size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(kept, taken) with ``taken`` ~ fraction (or ``size``) of ``idx``, stratified by ``labels``.

    sklearn refuses to stratify a label with a single member; those are pooled into one bucket
    first, and if that still fails the take is a plain seeded random one.
    """
    from sklearn.model_selection import train_test_split

    take = size if size is not None else fraction
    if len(idx) < 2 or (size is not None and size <= 0) or (size is None and round(fraction * len(idx)) < 1):
        return idx, idx[:0]
    strata = labels[idx].copy()
    counts = Counter(strata.tolist())
    strata[np.isin(strata, [k for k, c in counts.items() if c < 2])] = -1
    if np.count_nonzero(strata == -1) == 1:  # a pool of one is no better: join the largest stratum
        strata[strata == -1] = counts.most_common(1)[0][0]
    for stratify in (strata, None):
        try:
            kept, taken = train_test_split(idx, test_size=take, stratify=stratify, random_state=seed)
            return np.sort(kept), np.sort(taken)
        except ValueError:
            continue
    return idx, idx[:0]


def stratified_subset(records: list[dict], limit: int, seed: int) -> list[dict]:
    """``limit`` records stratified by (given split, grade), in input order; all when limit <= 0."""
    if limit <= 0 or limit >= len(records):
        return records
    keys = [f"{r['split'] or ''}:{r['grade']}" for r in records]
    codes = np.unique(keys, return_inverse=True)[1]
    _, taken = _stratified_take(np.arange(len(records)), codes, 0.0, seed, size=limit)
    return [records[i] for i in taken]
