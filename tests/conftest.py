"""Shared fixtures: real data beside the checkout, a small embedded default, one Ray instance, an S3 server."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import s3 as s3_server

REPO = Path(__file__).resolve().parents[1]
# Before any test starts Ray: its workers inherit this environment and reach the test S3 server.
s3_server.set_environment()
SHARED_DATA = Path(os.environ.get("APTOS_RAY_SHARED_DATA", REPO.parent / "shared" / "data"))


def pytest_collection_modifyitems(config, items):
    """A test that uses Ray (through the ``ray_session`` fixture) is marked ``ray`` without saying so."""
    for item in items:
        if "ray_session" in item.fixturenames:
            item.add_marker(pytest.mark.ray)


@pytest.fixture(autouse=True)
def no_ray_in_the_fast_tier(request, monkeypatch):
    """``make test-fast`` (APTOS_RAY_FAST_TIER=1) runs no Ray: a test that starts it unmarked fails."""
    if os.environ.get("APTOS_RAY_FAST_TIER") and "ray" not in request.keywords:
        import ray

        def refuse(*args, **kwargs):
            raise RuntimeError(f"{request.node.nodeid} starts Ray: mark it @pytest.mark.ray")

        monkeypatch.setattr(ray, "init", refuse)


@pytest.fixture(scope="session")
def aptos_dir() -> Path:
    path = SHARED_DATA / "aptos2019-224"
    if not (path / "labels.csv").is_file():
        pytest.skip(f"real APTOS data not found at {path}")
    return path


@pytest.fixture(scope="session")
def retinamnist_dir() -> Path:
    path = SHARED_DATA / "retinamnist"
    if not (path / "retinamnist.npz").is_file():
        pytest.skip(f"RetinaMNIST not found at {path}")
    return path


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for every test that needs it (starting Ray costs seconds)."""
    import ray

    from aptos_ray.ray_setup import local_ray_options, private_default_token

    if not ray.is_initialized():
        private_default_token()  # Ray would write ~/.ray/auth_token 0644
        options = local_ray_options()
        options["runtime_env"]["env_vars"]["PYTHONWARNINGS"] = "ignore"
        ray.init(num_cpus=2, log_to_driver=False, **options)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3():
    """moto's S3 server on localhost (tests/s3.py); ``s3.bucket()`` makes a fresh bucket."""
    server = s3_server.S3()
    yield server
    server.stop()
