"""A one-machine autoscaling Ray cluster for tests: Ray's fake multi-node provider (what
``ray.cluster_utils.AutoscalingCluster`` and Ray's own autoscaler tests use) behind a head with
CPUs only, and one worker node type that the autoscaler starts on demand (``min_workers: 0``).

``AutoscalingCluster`` itself is not used: its ``start()`` runs ``ray stop --force``, which ends
every Ray process of the machine (other jobs' too), and the Ray 2.60 wheel lacks the
``fake_multi_node/example.yaml`` it builds its config from. The head here is a
``ray.cluster_utils.Cluster`` node of this process, stopped with it; the nodes the autoscaler
starts are its own processes' children, ended by their ids.

Run as a script (``python tests/autoscaling_cluster.py``): the admission checks of
``check_cluster_fits`` against the node types, printed as ``CHECK name: ok|<error>`` lines.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import yaml

WORKER_TYPE = "ray.worker.gpu"
HEAD_TYPE = "ray.head.default"


def autoscaling_config(gcs_address: str, worker_resources: dict, max_workers: int) -> dict:
    return {
        "cluster_name": "aptos-fake",
        "max_workers": max_workers,
        "provider": {"type": "fake_multinode", "gcs_address": gcs_address, "use_node_id_as_ip": True,
                     "disable_node_updaters": True, "disable_launch_config_check": True},
        "available_node_types": {
            HEAD_TYPE: {"resources": {"CPU": 1}, "node_config": {}, "max_workers": 0},
            WORKER_TYPE: {"resources": worker_resources, "node_config": {}, "min_workers": 0,
                          "max_workers": max_workers},
        },
        "head_node_type": HEAD_TYPE,
        "upscaling_speed": 1.0, "idle_timeout_minutes": 5, "auth": {}, "docker": {},
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [],
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def fake_autoscaling_cluster(worker_resources: dict, max_workers: int = 1):
    """A connected head (1 CPU) whose autoscaler can start up to ``max_workers`` nodes with
    ``worker_resources`` (none at first)."""
    import psutil
    import ray
    import ray._private.services
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    ip = ray._private.services.get_node_ip_address()
    port = free_port()
    folder = Path(tempfile.mkdtemp(prefix="aptos-autoscale-"))
    config = folder / "autoscaling.yaml"
    config.write_text(yaml.safe_dump(autoscaling_config(f"{ip}:{port}", worker_resources, max_workers)))
    # read by the autoscaler process the head starts: the fake provider, and a 1 s update period
    os.environ.update({"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"})
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "gcs_server_port": port, "autoscaling_config": str(config),
        "include_dashboard": False})
    monitor = cluster.head_node.all_processes[ray_constants.PROCESS_TYPE_MONITOR][0].process.pid
    started: dict[int, psutil.Process] = {}
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        yield cluster, lambda: started.update({p.pid: p for p in psutil.Process(monitor).children(recursive=True)})
    finally:
        try:  # the nodes the autoscaler started are the autoscaler's children: note them before it ends
            started.update({p.pid: p for p in psutil.Process(monitor).children(recursive=True)})
        except psutil.NoSuchProcess:
            pass
        ray.shutdown()
        cluster.shutdown()
        for proc in started.values():
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        shutil.rmtree(folder, ignore_errors=True)


def alive_nodes() -> list[dict]:
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def wait_for(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.5)
    return False


def check(name: str, fn) -> None:
    try:
        fn()
        print(f"CHECK {name}: ok", flush=True)
    except Exception as e:  # noqa: BLE001 - the test reads the message
        print(f"CHECK {name}: {type(e).__name__}: {e}", flush=True)


def main() -> None:
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    from aptos_ray.config import parse_args
    from aptos_ray.train.ray_backend import check_cluster_fits

    gpu = ["--scaling.use_gpu=true", "--scaling.cpus_per_worker=1"]
    with fake_autoscaling_cluster({"CPU": 2, "GPU": 2}, max_workers=1):
        print(f"NODES before: {len(alive_nodes())}", flush=True)
        # 3 workers of 1 GPU: the one node the autoscaler may start holds 2
        check("beyond max_workers", lambda: check_cluster_fits(parse_args(["--scaling.num_workers=3", *gpu])))
        print(f"NODES after refusal: {len(alive_nodes())}", flush=True)
        check("two GPU workers", lambda: check_cluster_fits(parse_args(["--scaling.num_workers=2", *gpu])))
        # what Ray Train asks for those two workers: the autoscaler starts the GPU node
        group = placement_group([{"CPU": 1, "GPU": 1}] * 2, strategy="PACK")
        ready = wait_for(lambda: group.wait(0.1), timeout=90)
        print(f"PLACED: {ready}; NODES: {len(alive_nodes())}; GPUs: {ray.cluster_resources().get('GPU', 0):g}",
              flush=True)
        remove_placement_group(group)


if __name__ == "__main__":
    sys.exit(main())
