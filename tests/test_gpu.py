"""What only a GPU shows (``pytest -m gpu``; benchmarks/gpu_check.sh runs these). Skipped without CUDA.

Data: synthetic fundus photos written as a prepared dataset, so a bare GPU machine needs no shared folder.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import helpers
import numpy as np
import pytest
import ray
import torch
from helpers import failing_worker, synthetic_subset

from aptos_ray.config import parse_args
from aptos_ray.model.factory import create_model
from aptos_ray.model.heads import get_head
from aptos_ray.train import ray_backend
from aptos_ray.train.augment import GradeTransforms, prefetch_to_device
from aptos_ray.train.driver import train
from aptos_ray.train.step import AUTOCAST_DTYPES, Training, autocast, grad_scaler, train_one_epoch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

TINY = [*helpers.TINY, "--data.image_size=64", "--train.max_steps_per_epoch=4", "--scaling.use_gpu=true"]
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture(scope="module")
def fundus_data(tmp_path_factory) -> Path:
    return synthetic_subset(tmp_path_factory.mktemp("gpu") / "prepared", size=64, per_grade=8, copies=2)


def history(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def tiny_model() -> torch.nn.Module:
    return create_model(helpers.tiny_model())


def test_resume_on_cuda_keeps_the_optimizer_on_the_gpu(fundus_data, tmp_path):
    """The restore-order bug: Adam's state restored on the CPU failed the first resumed step."""
    args = [*TINY, "--local", f"--data.dataset={fundus_data}", f"--train.output={tmp_path}", "--train.name=resume"]
    train(parse_args([*args, "--train.epochs=1"]))
    summary = train(parse_args([*args, "--train.epochs=2", "--resume"]))
    epochs = history(tmp_path / "resume")
    assert [h["epoch"] for h in epochs] == [0, 1] and summary["epochs"] == 2
    assert all(np.isfinite(h["train_loss"]) and h["peak_gpu_memory_mb"][0] > 0 for h in epochs)
    state = torch.load(tmp_path / "resume" / "checkpoint_epoch_0001" / "model.pt", weights_only=True)
    assert state["optimizer"]["state"], "the resumed epoch should have stepped Adam"


@pytest.mark.ray
def test_ray_restarts_a_failed_cuda_worker_from_its_checkpoint(fundus_data, tmp_path, ray_session, monkeypatch):
    monkeypatch.setattr(ray_backend, "train_worker", failing_worker)  # rank 0 dies once in epoch 1
    ray.cloudpickle.register_pickle_by_value(helpers)  # the workers cannot import tests/helpers.py
    args = [*TINY, f"--data.dataset={fundus_data}", f"--train.output={tmp_path}", "--train.name=restart",
            "--scaling.num_workers=1", "--scaling.max_failures=1", "--train.epochs=2"]
    train(parse_args(args))
    assert (tmp_path / "restart" / ".failure_injected").is_file()  # the worker really died
    assert [h["epoch"] for h in history(tmp_path / "restart")] == [0, 1]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_steps_train(precision):
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bfloat16")
    device = torch.device("cuda")
    model = tiny_model().to(device).to(memory_format=torch.channels_last)
    before = copy.deepcopy(model.state_dict())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = grad_scaler(precision)
    rng = np.random.default_rng(0)
    batches = [(rng.integers(0, 256, (8, 72, 72, 3), dtype=np.uint8), rng.integers(0, 5, 8)) for _ in range(6)]
    training = Training(model, GradeTransforms(64, MEAN, STD), get_head("classification").loss(None, 0.0), optimizer,
                        None, device, scaler, precision, channels_last=True)
    stats = train_one_epoch(training, batches, steps=6)
    assert stats["train_images"] == 48 and np.isfinite(stats["train_loss"])
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert scaler.is_enabled() == (precision == "fp16")
    if precision == "fp16":
        assert scaler.get_scale() > 0
    with torch.no_grad(), autocast(device, precision):
        assert model(torch.randn(2, 3, 64, 64, device=device)).dtype == AUTOCAST_DTYPES[precision]


def test_channels_last_gives_the_same_outputs():
    device = torch.device("cuda")
    model = tiny_model().to(device).eval()
    x = torch.randn(4, 3, 64, 64, device=device)
    channels_last = copy.deepcopy(model).to(memory_format=torch.channels_last)
    conv = next(m for m in channels_last.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(channels_last(x.contiguous(memory_format=torch.channels_last)), model(x),
                                   atol=1e-3, rtol=1e-3)


def test_device_augmentation_matches_the_cpu_and_prefetch_lands_on_the_gpu():
    """Same random draws (parameters come from the CPU generator) give the same batch on both devices."""
    device = torch.device("cuda")
    images = np.random.default_rng(0).integers(0, 256, (6, 80, 80, 3), dtype=np.uint8)
    batches = [(images, np.arange(6) % 5)] * 3
    fed = list(prefetch_to_device(iter(batches), device, depth=2))
    assert len(fed) == 3 and all(x.is_cuda and y.is_cuda for x, y, _ in fed)
    tf = GradeTransforms(64, MEAN, STD)
    torch.manual_seed(0)
    on_cpu = tf.train(images)
    torch.manual_seed(0)
    on_gpu = tf.train(fed[0][0])
    assert on_gpu.is_cuda
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, atol=2e-3, rtol=1e-3)


@pytest.mark.ray
def test_two_ddp_ranks_share_one_gpu(fundus_data, tmp_path, ray_session):
    """Two Ray Train workers on one GPU (0.5 each): NCCL refuses two ranks on one device, so gloo."""
    train(parse_args([*TINY, f"--data.dataset={fundus_data}", f"--train.output={tmp_path}", "--train.name=ddp",
                      "--scaling.num_workers=2", "--scaling.gpus_per_worker=0.5", "--train.epochs=1"]))
    (epoch,) = history(tmp_path / "ddp")
    assert len(epoch["peak_gpu_memory_mb"]) == 2 and min(epoch["peak_gpu_memory_mb"]) > 0
    assert np.isfinite(epoch["train_loss"])


@pytest.mark.ray
def test_sync_batchnorm_on_two_ranks(fundus_data, tmp_path, ray_session):
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
