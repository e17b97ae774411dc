"""Device placement and precision, checked on the CPU: what a GPU run depends on."""

from __future__ import annotations

import helpers
import pytest
import torch
from tqdm import tqdm

from aptos_ray.config import parse_args
from aptos_ray.model.factory import create_model
from aptos_ray.train import loop
from aptos_ray.train.checkpoint import Checkpoint
from aptos_ray.train.loop import DatasetInfo, build_optimizer, build_scheduler, fit
from aptos_ray.train.step import autocast, grad_scaler, resolve_precision

TINY = [*helpers.TINY, "--train.batch_size=4", "--train.eval_batch_size=64", "--optim.warmup_epochs=1",
        "--train.epochs=2"]


class RestoreProbe(Exception):
    """Raised where the first epoch would start: restoring is over, the optimizer can be inspected."""


class MovingBackend:
    """A backend whose ``prepare_model`` moves the model as a GPU backend would (to ``meta`` here, or to
    float64: the CPU stand-ins for ``cuda``) and that stops ``fit`` before its first epoch."""

    rank, world_size, progress_bar = 0, 1, tqdm

    def __init__(self, restored: Checkpoint, device: str, dtype: torch.dtype | None):
        self.restored = restored
        self.device, self.dtype = torch.device(device), dtype

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(self.device, self.dtype) if self.dtype else model.to(self.device)

    def restored_state(self) -> Checkpoint:
        return self.restored

    def train_rows(self, epoch: int):
        raise RestoreProbe

    def val_rows(self):
        return iter(())

    def report(self, metrics, checkpoint_dir, epoch) -> None:
        pass


def checkpoint_after_one_step(cfg) -> Checkpoint:
    """What a resume reads after epoch 0: weights and an Adam state with moments in it."""
    model = create_model(cfg.model)
    optimizer = build_optimizer(cfg.optim, model)
    scheduler = build_scheduler(cfg.optim, optimizer, steps=4, epochs=cfg.train.epochs)
    loss = model(torch.randn(2, 3, 32, 32)).square().mean()
    loss.backward()
    optimizer.step()
    scheduler.step()
    return Checkpoint("memory", cfg, model.state_dict(), None, 0, {}, optimizer=optimizer.state_dict(),
                      scheduler=scheduler.state_dict(), scaler=grad_scaler("fp32").state_dict())


@pytest.mark.parametrize("device, dtype", [("meta", None), ("cpu", torch.float64)])
def test_restored_optimizer_state_follows_the_prepared_model(tmp_path, monkeypatch, device, dtype):
    """The resume bug: optimizer state loaded before prepare_model moved the model stays where the
    model was (the CPU), so a resumed GPU run fails at its first step."""
    cfg = parse_args([*TINY, f"--train.output={tmp_path}", "--train.name=resume"])
    built = []
    monkeypatch.setattr(loop, "build_optimizer", lambda optim, model: built.append(build_optimizer(optim, model))
                        or built[-1])
    backend = MovingBackend(checkpoint_after_one_step(cfg), device, dtype)
    with pytest.raises(RestoreProbe):
        fit(cfg, backend, DatasetInfo(train_counts={g: 8 for g in range(5)}, num_val=0))
    (optimizer,) = built
    params = [p for group in optimizer.param_groups for p in group["params"]]
    assert params and all(p.device.type == device and p.dtype == (dtype or torch.float32) for p in params)
    for p in params:
        state = optimizer.state[p]
        assert {"exp_avg", "exp_avg_sq"} <= set(state), "the restored state should hold Adam's moments"
        for name, value in state.items():
            if name != "step":  # Adam keeps its step counter on the CPU by design
                assert (value.device, value.dtype) == (p.device, p.dtype), name


@pytest.mark.parametrize("precision", ["auto", "bf16", "fp16", "fp32"])
def test_cpu_always_trains_in_fp32(precision):
    assert resolve_precision(precision, torch.device("cpu")) == "fp32"
    assert isinstance(autocast(torch.device("cpu"), "bf16"), type(autocast(torch.device("cpu"), "fp32")))


def simulate_gpu(monkeypatch, capability: tuple[int, int]) -> None:
    """A CUDA device of ``capability`` on a CPU machine; torch counts emulated bf16 as supported, as it does."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)


@pytest.mark.parametrize("capability, precision, expected", [
    ((7, 5), "auto", "fp16"), ((7, 0), "auto", "fp16"), ((8, 0), "auto", "bf16"), ((9, 0), "auto", "bf16"),
    ((8, 6), "bf16", "bf16"), ((7, 5), "fp16", "fp16"), ((9, 0), "fp16", "fp16"), ((7, 5), "fp32", "fp32"),
])
def test_gpu_precision_takes_bf16_only_where_native(monkeypatch, capability, precision, expected):
    # T4 (7.5) and V100 (7.0) emulate bf16, slowly: auto gives them fp16 with a loss scaler.
    simulate_gpu(monkeypatch, capability)
    resolved = resolve_precision(precision, torch.device("cuda"))
    assert resolved == expected
    assert grad_scaler(resolved).is_enabled() == (expected == "fp16")


def test_bf16_on_a_gpu_without_native_bf16_is_a_clear_error(monkeypatch):
    simulate_gpu(monkeypatch, (7, 5))
    with pytest.raises(ValueError, match=r"train.precision=bf16 but this GPU \(compute capability 7.5\) has no native"):
        resolve_precision("bf16", torch.device("cuda"))


def test_only_fp16_gets_a_loss_scaler():
    # GradScaler("cuda") disables itself without CUDA, so only the disabled cases are checkable here.
    assert not grad_scaler("bf16").is_enabled() and not grad_scaler("fp32").is_enabled()


def test_unknown_precision_fails_on_the_command_line(tmp_path):
    with pytest.raises(ValueError, match="'train.precision': input should be 'auto', 'bf16', 'fp16' or 'fp32', got 'fp8'"):
        parse_args([*TINY, "--local", f"--train.output={tmp_path}", "--train.precision=fp8"])
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("use_gpu, gpus, backend, expected", [
    (False, 1.0, "auto", "gloo"), (True, 1.0, "auto", "nccl"), (True, 0.5, "auto", "gloo"), (True, 1.0, "gloo", "gloo"),
])
def test_ddp_backend_is_gloo_where_workers_share_a_gpu(use_gpu, gpus, backend, expected):
    from aptos_ray.train.ray_backend import ddp_backend, worker_resources

    cfg = parse_args([f"--scaling.use_gpu={use_gpu}", f"--scaling.gpus_per_worker={gpus}",
                      f"--scaling.ddp_backend={backend}", "--scaling.cpus_per_worker=2"])
    assert ddp_backend(cfg.scaling) == expected
    assert worker_resources(cfg.scaling) == ({"CPU": 2.0, "GPU": gpus} if use_gpu else {"CPU": 2.0})


def test_unknown_ddp_backend_is_a_clear_error():
    with pytest.raises(ValueError, match="'scaling.ddp_backend': input should be 'auto', 'nccl' or 'gloo', got 'mpi'"):
        parse_args(["--scaling.ddp_backend=mpi"])


# --- what a GPU step waits for: host reads and small copies --------------------------------------

def count_calls(monkeypatch, cls, name: str, keep=lambda *a, **k: True) -> list:
    """Calls of ``cls.name`` from here on (those ``keep`` selects), the method still doing its work."""
    calls, original = [], getattr(cls, name)

    def counted(*args, **kwargs):
        if keep(*args, **kwargs):
            calls.append(args[1:])
        return original(*args, **kwargs)

    monkeypatch.setattr(cls, name, counted)
    return calls


def test_a_training_epoch_reads_the_loss_from_the_device_once(monkeypatch):
    # .item() each step makes the CPU wait for the GPU to finish the step before queueing the next.
    import numpy as np

    from aptos_ray.model.heads import get_head
    from aptos_ray.train.augment import GradeTransforms
    from aptos_ray.train.step import Training, train_one_epoch

    model = create_model(parse_args(TINY).model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    rng = np.random.default_rng(0)
    batches = [(rng.integers(0, 256, (4, 40, 40, 3), dtype=np.uint8), rng.integers(0, 5, 4)) for _ in range(6)]
    reads = count_calls(monkeypatch, torch.Tensor, "item")
    training = Training(model, GradeTransforms(32, (0.5,) * 3, (0.25,) * 3), get_head("classification").loss(),
                        optimizer)
    stats = train_one_epoch(training, batches, steps=6)
    assert stats["train_images"] == 24 and np.isfinite(stats["train_loss"])
    assert len(reads) == 1, f"{len(reads)} host reads of the loss in 6 steps"
    assert stats["steady_images_per_s"] > 0


def test_augmentation_sends_its_random_parameters_to_the_device_in_one_copy(monkeypatch):
    # "meta" stands in for a GPU: every .to(meta) would be a host-to-device copy there.
    from aptos_ray.train.augment import CAMERA, GradeTransforms

    images = torch.zeros(4, 80, 80, 3, dtype=torch.uint8, device="meta")
    for extra in ({}, CAMERA):
        tf = GradeTransforms(64, (0.5,) * 3, (0.25,) * 3, **extra)
        tf.train(images)  # the first call also copies mean, std and the luma weights, once
        copies = count_calls(monkeypatch, torch.Tensor, "to",
                             keep=lambda t, *a, **k: t.device.type == "cpu" and "meta" in str(a) + str(k))
        assert tf.train(images).shape == (4, 3, 64, 64)
        assert len(copies) == 1, f"{len(copies)} host-to-device copies per augmentation call ({extra})"
        monkeypatch.undo()


@pytest.mark.parametrize("deterministic, device, expected", [
    (False, "cuda", True), (True, "cuda", False), (False, "cpu", False),
])
def test_cudnn_picks_its_fastest_kernels_where_repeatability_is_off(deterministic, device, expected):
    from aptos_ray.train.step import repeatable

    before = torch.backends.cudnn.benchmark
    with repeatable(0, deterministic, torch.device(device)):
        assert torch.backends.cudnn.benchmark == (expected or before)
    assert torch.backends.cudnn.benchmark == before


def test_more_than_one_gpu_per_worker_is_refused_in_one_line():
    from aptos_ray.config import ConfigError

    with pytest.raises(ConfigError, match=r"^scaling.gpus_per_worker=2: a worker trains on one GPU[^\n]*$"):
        parse_args(["--scaling.use_gpu=true", "--scaling.gpus_per_worker=2"])
    assert parse_args(["--scaling.use_gpu=false", "--scaling.gpus_per_worker=2"]).scaling.gpus_per_worker == 2
