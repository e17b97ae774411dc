"""Connecting to Ray: one place for every job (prepare, train, tune, predict)."""

from __future__ import annotations

import os
import socket

import ray

from aptos_ray.config import ScalingConfig


def init_ray(scaling: ScalingConfig) -> None:
    """Connect to ``scaling.address`` or RAY_ADDRESS (e.g. inside ``ray job submit``), else start
    a local Ray instance."""
    if ray.is_initialized():
        return
    address = scaling.address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(log_to_driver=True, **local_ray_options())


def local_ray_options() -> dict:
    """``ray.init`` options for a local instance whose workers can reach its dashboard.

    Ray Train's placement-group cleaner asks the state API whether its controller is alive; in a
    worker without RAY_ADDRESS that finds the cluster by scanning for GCS processes and fails
    ("Found multiple active Ray instances") when the machine runs more than one. A Tune trial
    stopped by ASHA then never frees its workers' CPUs and the next trial waits forever.
    Fixing the dashboard port lets every worker be told where the API server is. (Ray Train V2
    needs the dashboard anyway: without it the same cleaner removes live workers.)
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return {
        "include_dashboard": True,
        "dashboard_host": "127.0.0.1",
        "dashboard_port": port,
        "runtime_env": {"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}},
    }
