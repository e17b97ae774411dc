"""What only a GPU shows, without Ray (``pytest -m gpu``; benchmarks/gpu_check.sh runs these first).
Skipped without CUDA. The Ray ones are in test_gpu_ray.py: the borrowed GPU machine has no Ray until
its wheels are installed (benchmarks/GPU_CHECK.md).

Data: synthetic fundus photos written as a prepared dataset, so a bare GPU machine needs no shared folder.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import helpers
import numpy as np
import pytest
import torch
from helpers import synthetic_subset

from aptos_ray.config import parse_args
from aptos_ray.model.factory import create_model
from aptos_ray.model.heads import get_head
from aptos_ray.train.augment import GradeTransforms, prefetch_to_device
from aptos_ray.train.driver import train
from aptos_ray.train.step import AUTOCAST_DTYPES, Training, autocast, grad_scaler, native_bf16, train_one_epoch

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


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_steps_train(precision):
    if precision == "bf16" and not native_bf16(torch.device("cuda")):
        pytest.skip("this GPU has no native bfloat16")
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
    x = torch.randn(2, 3, 64, 64, device=device)
    with torch.no_grad(), autocast(device, precision):
        assert model.forward_features(x).dtype == AUTOCAST_DTYPES[precision]
        assert model(x).dtype == torch.float32  # the grade head computes in fp32 (scores off the bf16 grid)


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
