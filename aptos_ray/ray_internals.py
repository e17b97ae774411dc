"""What this project needs from Ray that Ray has no public API for, in one place (Ray is imported
inside the functions: ``--local`` runs import this module without starting or loading Ray).

Each name here is checked against the installed Ray by ``tests/test_ray_internals.py``, which fails
naming the Ray version when an upgrade moves it. Everything else is imported from Ray's public
modules where it is used.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class NodeType:
    """Nodes of one kind that the cluster has or that its autoscaler can start: each node's
    resources, and how many such nodes there can be (``math.inf``: no limit)."""

    name: str
    resources: dict = field(hash=False)
    max_count: float


def autoscaler_node_types() -> list[NodeType] | None:
    """The node types the connected cluster's autoscaler can start, up to each one's max count;
    None when no autoscaler publishes them (a fixed cluster, or an autoscaler out of sight).

    Two places, in order: the cluster config in the GCS (what Ray Train 2.60 reads for its own
    worker-group check; reported by platforms that run the autoscaler for Ray), then the
    ``--autoscaling-config`` file of the autoscaler process (``monitor.py``) serving this cluster
    on this node: the cluster launcher's ``ray_bootstrapped_config.yaml`` on the head, where
    ``ray job submit`` runs its drivers. Neither has a public API in Ray 2.60."""
    import ray

    if not ray.is_initialized():
        return None
    return _gcs_cluster_config_node_types() or _monitor_config_node_types()


def autoscaler_running() -> bool:
    """An autoscaler that can start nodes serves this cluster. Its status report (JSON in the GCS,
    every few seconds) maps each node to its node type; a cluster without one (e.g. a local
    ``ray.init()``) runs a read-only autoscaler whose node types are the nodes' own ids."""
    import ray
    from ray._private import ray_constants
    from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_initialized

    if not ray.is_initialized() or not _internal_kv_initialized():
        return False
    raw = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
    mapping = ((json.loads(raw) if raw else {}).get("autoscaler_report") or {}).get("node_type_mapping") or {}
    return any(node_type != f"node_{node}" for node, node_type in mapping.items())


def _gcs_cluster_config_node_types() -> list[NodeType] | None:
    import ray._private.state

    config = ray._private.state.state.get_cluster_config()
    if config is None or not config.node_group_configs:
        return None
    # max_count -1: no limit (autoscaler.proto)
    return [NodeType(g.name, dict(g.resources), math.inf if g.max_count < 0 else g.max_count)
            for g in config.node_group_configs]


def _monitor_config_node_types() -> list[NodeType] | None:
    import ray
    import yaml

    path = _monitor_config_path(ray.get_runtime_context().gcs_address)
    if path is None:
        return None
    try:
        with open(path) as f:
            config = yaml.safe_load(f)
    except (OSError, yaml.YAMLError):
        return None
    return node_types_from_autoscaling_config(config)


def node_types_from_autoscaling_config(config: dict) -> list[NodeType] | None:
    """``available_node_types`` of a cluster-launcher / autoscaler YAML: the head type counts once
    (its ``max_workers`` means something else there), a worker type up to its ``max_workers``,
    itself at most the cluster's ``max_workers``."""
    types = (config or {}).get("available_node_types") or {}
    cluster_max = config.get("max_workers", math.inf)
    head = config.get("head_node_type")
    found = [NodeType(name, dict(t.get("resources") or {}),
                      1 if name == head else min(t.get("max_workers", cluster_max), cluster_max))
             for name, t in types.items()]
    return found or None


def _monitor_config_path(gcs_address: str) -> str | None:
    # The autoscaler's process is the only place that names its config file (services.start_monitor).
    import psutil

    wanted = f"--gcs-address={gcs_address}"
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info.get("cmdline") or []
        if wanted in cmdline and any(a.endswith("monitor.py") for a in cmdline):
            for arg in cmdline:
                if arg.startswith("--autoscaling-config="):
                    return arg.split("=", 1)[1]
    return None


# --- Ray Train ------------------------------------------------------------------------------------

# Ray Train's record of a run's kept checkpoints, written into the run directory
# (ray.train.v2._internal.constants.CHECKPOINT_MANAGER_SNAPSHOT_FILENAME).
CHECKPOINT_MANAGER_SNAPSHOT = "checkpoint_manager_snapshot.json"


def worker_error_cause(error: BaseException) -> BaseException | None:
    """The exception a worker's code raised, inside Ray Train's wrapper for it
    (``UserExceptionWithTraceback`` keeps it as ``_base_exc``); None for anything else."""
    return getattr(error, "_base_exc", None)


def report_logger_name() -> str | None:
    """The name of the logger behind Ray Train's "Reporting training result N: ..." lines:
    ``logging.getLogger(__file__)`` of its worker-side context module, outside ``ray.train``."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:
        return None
    return context.__file__
