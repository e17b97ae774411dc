"""What only a GPU shows, through Ray (``pytest -m gpu``; the second part of benchmarks/gpu_check.sh).
Skipped without CUDA or without Ray (the borrowed GPU machine has Ray only once its wheels are installed).
"""

from __future__ import annotations

import helpers
import numpy as np
import pytest
import torch
from helpers import failing_worker
from test_gpu import TINY, fundus_data, history  # noqa: F401  (fundus_data is a fixture)

from aptos_ray.config import parse_args
from aptos_ray.train.driver import train

ray = pytest.importorskip("ray")
from aptos_ray.train import ray_backend  # noqa: E402  (imports Ray)

pytestmark = [pytest.mark.gpu, pytest.mark.ray,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_ray_restarts_a_failed_cuda_worker_from_its_checkpoint(fundus_data, tmp_path, ray_session, monkeypatch):  # noqa: F811  (the fixture imported from test_gpu)
    monkeypatch.setattr(ray_backend, "train_worker", failing_worker)  # rank 0 dies once in epoch 1
    ray.cloudpickle.register_pickle_by_value(helpers)  # the workers cannot import tests/helpers.py
    args = [*TINY, f"--data.dataset={fundus_data}", f"--train.output={tmp_path}", "--train.name=restart",
            "--scaling.num_workers=1", "--scaling.max_failures=1", "--train.epochs=2"]
    train(parse_args(args))
    assert (tmp_path / "restart" / ".failure_injected").is_file()  # the worker really died
    assert [h["epoch"] for h in history(tmp_path / "restart")] == [0, 1]



def test_two_ddp_ranks_share_one_gpu(fundus_data, tmp_path, ray_session):  # noqa: F811  (the fixture imported from test_gpu)
    """Two Ray Train workers on one GPU (0.5 each): NCCL refuses two ranks on one device, so gloo."""
    train(parse_args([*TINY, f"--data.dataset={fundus_data}", f"--train.output={tmp_path}", "--train.name=ddp",
                      "--scaling.num_workers=2", "--scaling.gpus_per_worker=0.5", "--train.epochs=1"]))
    (epoch,) = history(tmp_path / "ddp")
    assert len(epoch["peak_gpu_memory_mb"]) == 2 and min(epoch["peak_gpu_memory_mb"]) > 0
    assert np.isfinite(epoch["train_loss"])


def test_sync_batchnorm_on_two_ranks(fundus_data, tmp_path, ray_session):  # noqa: F811  (the fixture imported from test_gpu)
    share = 1 if torch.cuda.device_count() >= 2 else 0.5  # one GPU per rank (NCCL, the real setup) if there are 2
    args = [*TINY, f"--data.dataset={fundus_data}", f"--train.output={tmp_path}", "--train.name=syncbn",
            "--scaling.num_workers=2", f"--scaling.gpus_per_worker={share}", "--train.epochs=1",
            "--model.batch_norm=sync"]
    try:
        train(parse_args(args))
    except Exception as error:  # noqa: BLE001 - only gloo's known gap is skipped, anything else fails
        if torch.cuda.device_count() < 2 and "gloo" in str(error).lower():
            pytest.skip(f"SyncBatchNorm over gloo on one GPU: {str(error).splitlines()[0][:200]}")
        raise
    (epoch,) = history(tmp_path / "syncbn")
    assert np.isfinite(epoch["train_loss"]) and len(epoch["peak_gpu_memory_mb"]) == 2
