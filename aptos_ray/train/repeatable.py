"""Repeatable CPU training: the same seed, data and machine give the same weights and figures.

What varies a CPU run otherwise, and what holds it still:
- torch's thread count (``train.threads``): float sums split over a different number of threads
  add in a different order; a fixed count (Ray workers have ``cpus_per_worker``) fixes the order;
- kernels without a deterministic path (``train.deterministic``: ``torch.use_deterministic_algorithms``,
  warning where an op has none rather than failing the run);
- the random stream of augmentation, dropout and stochastic depth: reseeded at every epoch from
  (seed, epoch, rank) (``epoch_seed``), so an epoch draws the same numbers whether the run got there
  in one go or resumed from a checkpoint. Row order is already seeded (the local backend's
  permutation, Ray Data's ``local_shuffle_seed``), and so is resampling (per row id, ``train.sampling``).

Ray runs with several workers split the training data between them in the order blocks are asked
for, which Ray Data does not fix: they are repeatable within the spread stated in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """torch's seed for one epoch of one rank: independent streams for every (seed, epoch, rank)."""
    return int(np.random.SeedSequence([seed & 0xFFFFFFFF, epoch, rank]).generate_state(1)[0])


@contextlib.contextmanager
def repeatable(threads: int, deterministic: bool, device: torch.device) -> Iterator[None]:
    """Fixed thread count and deterministic kernels (CPU) while the block runs; restored after it
    (a test process runs several fits)."""
    old_threads, old_mode = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    old_warn, old_benchmark = torch.is_deterministic_algorithms_warn_only_enabled(), torch.backends.cudnn.benchmark
    if threads:
        torch.set_num_threads(threads)
    if deterministic and device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
    if not deterministic and device.type == "cuda":
        # cuDNN times its kernels for each input shape once and keeps the fastest; which one wins
        # can differ between runs, so only where repeatability was not asked for.
        torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_mode, warn_only=old_warn)
        torch.backends.cudnn.benchmark = old_benchmark
