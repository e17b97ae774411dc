"""Connecting to Ray: one place for every job (prepare, train, tune, predict)."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import secrets
import socket
import subprocess
import sys
from pathlib import Path

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from aptos_ray import storage
from aptos_ray.config import ScalingConfig
from aptos_ray.errors import DriverOnlyPathError, GpuUnusableError
from aptos_ray.ray_internals import NodeType, autoscaler_node_types, autoscaler_running


def init_ray(scaling: ScalingConfig) -> None:
    """Connect to ``scaling.address`` or RAY_ADDRESS (e.g. inside ``ray job submit``), else start
    a local Ray instance. Quiet unless ``scaling.verbose`` (see ``QUIET_ENV``)."""
    set_ray_env(scaling.verbose)
    if ray.is_initialized():
        return
    # Workers' output reaches the driver (log_to_driver): the epoch lines are printed by rank 0.
    options = {"log_to_driver": True, "logging_level": logging.INFO if scaling.verbose else logging.WARNING}
    address = scaling.address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, **options)
    else:
        private_default_token()
        loopback_only()
        end_with_this_process()
        ray.init(**options, **local_ray_options())
    if not scaling.verbose:
        quiet_ray_data()


def check_seen_by_every_node(paths: dict[str, str]) -> None:
    """Local input paths (``{option: path}``) must exist on every node of a multi-node cluster.

    A task or actor on a node without the driver's files would fail deep inside Ray (raw images:
    one batch at a time, ``sources.read_bytes``); asking every node once, before any work starts,
    names the option and the node instead. URIs need no check, nor does a one-node cluster."""
    local = {key: storage.filesystem(path)[1] for key, path in paths.items() if path and storage.is_local(path)}
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if not local or len(nodes) < 2:
        return
    probes = {f"{n['NodeManagerAddress']} ({n['NodeID'][:8]})": _exist.options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(list(local.values()))
        for n in nodes}
    try:
        seen = dict(zip(probes, ray.get(list(probes.values()), timeout=120)))
    except ray.exceptions.GetTimeoutError:  # a node too busy to answer: the tasks will tell
        return
    for node, found in seen.items():
        for (key, path), exists in zip(local.items(), found):
            if not exists:
                raise DriverOnlyPathError(path, node=node, key=key)


@ray.remote(num_cpus=0)
def _exist(paths: list[str]) -> list[bool]:
    return [os.path.exists(p) for p in paths]


# What the cluster files pin for PyPI's torch CUDA 13 builds (docs/CLUSTER.md, section 5).
MIN_DRIVER_FOR_CUDA_13 = 580


def check_assigned_gpus_usable(what: str) -> None:
    """In a Ray worker or actor (``what``): the GPUs Ray assigned it must be usable by torch.
    Otherwise every step would fail at ``.to("cuda")`` (or predict quietly run on the CPU): say
    why in one line instead, typically a node driver older than torch's CUDA build needs."""
    import torch

    gpus = ray.get_gpu_ids()
    if not gpus or torch.cuda.is_available():
        return
    if torch.version.cuda is None:
        reason = "this torch is a CPU build (the cluster image's cpu variant on a GPU node?)"
    else:
        try:
            torch.cuda.init()
            reason = "torch sees no CUDA device"
        except Exception as e:  # torch's own words: no driver, driver too old, ...
            reason = " ".join(str(e).split())
    node = ray.util.get_node_ip_address()
    raise GpuUnusableError(
        f"Ray assigned GPU {', '.join(map(str, gpus))} to this {what} on node {node}, but torch "
        f"{torch.__version__} (CUDA {torch.version.cuda}) cannot use it: {reason}. The node's NVIDIA driver must "
        f"support torch's CUDA (CUDA 13: driver R{MIN_DRIVER_FOR_CUDA_13} or newer; see docs/CLUSTER.md)")


# Set before Ray starts: a local Ray instance's workers and actors inherit them.
RAY_ENV = {
    # Ray Train V2 sends a worker's print() to its logger *and* to stdout: every epoch line twice.
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
}
# Ray's own chatter, hidden without --verbose (errors and warnings stay): Ray Data's INFO lines
# ("Starting execution of Dataset ...", "Execution plan ...", and the progress it logs instead of
# bars when stdout is no terminal), and Ray's own deprecation warnings inside its actors. Ray
# Train's INFO lines ("Reporting training result N: ...") are set per run: ray_train_log_level.
QUIET_ENV = {
    "RAY_DATA_LOG_LEVEL": "WARNING",
    "PYTHONWARNINGS": "ignore::DeprecationWarning",
}


def set_ray_env(verbose: bool) -> None:
    for key, value in {**RAY_ENV, **({} if verbose else QUIET_ENV)}.items():
        os.environ.setdefault(key, value)


class _NotThis(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


RAY_DATA_FAILURE_LOGS = ("An exception was raised from a task of operator", "Full stack trace:",
                         "Exception occurred in Ray Data or Ray Core internal code")


def quiet_ray_data() -> None:
    """Ray Data in this process (the driver): no per-operator progress bars drawn by the driver
    for the workers (use_ray_tqdm), progress logged at INFO instead (hidden), and not the warning
    that jobs drawing their own bar (prepare, predict) cause by turning Ray's off."""
    import ray.data

    ray.data.DataContext.get_current().use_ray_tqdm = False  # a Dataset keeps the context it was made with
    data_logger = logging.getLogger("ray.data")
    data_logger.setLevel(logging.WARNING)
    for handler in data_logger.handlers:
        handler.addFilter(_NotThis("Progress bars disabled"))
        # A failed task's traceback, logged before the same error is raised here and reported by
        # the job (one line for a full disk, its traceback for a bug); --verbose shows them.
        for prefix in RAY_DATA_FAILURE_LOGS:
            handler.addFilter(_NotThis(prefix))


@contextlib.contextmanager
def ray_progress():
    """Ray Data's own progress bars (rows per operator) for jobs whose workers write their output
    (prepare, predict): drawn on a terminal, none in logs (CI, ray job logs), where they would
    repaint line by line. A Dataset copies the setting when it is built: wrap building and running."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    old = ctx.enable_progress_bars
    ctx.enable_progress_bars = sys.stderr.isatty()
    try:
        yield
    finally:
        ctx.enable_progress_bars = old


def ray_train_log_level(scaling: ScalingConfig) -> str:
    """Ray Train's console log level (its controller's and workers' ``ray.train`` loggers)."""
    return "INFO" if scaling.verbose else "WARNING"


def private_default_token() -> None:
    """Make ``~/.ray/auth_token`` readable by its owner only, before a local ``ray.init()`` needs it.

    A local ``ray.init()`` turns token authentication on and, when no token exists, writes one to
    ``~/.ray/auth_token`` with the umask's mode (0644: every user of the machine could read it and
    talk to the cluster). Creating it here, 0600 from the first byte, and tightening an existing
    one, closes that. A token given by RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH is left alone.
    """
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return
    path = Path.home() / ".ray" / "auth_token"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:  # the format Ray's own generator writes (256 random bits, hex)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    except FileExistsError:
        if path.stat().st_mode & 0o077:
            path.chmod(0o600)


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


def loopback_only() -> None:
    """Every port of a local Ray instance on 127.0.0.1: GCS, raylet, workers, the agents and the
    Prometheus metrics endpoints (dashboard, autoscaler, node metrics), which otherwise listen on
    all interfaces and answer anyone who can reach the machine, without a token.

    Ray (2.60) binds to the node's IP, and turns 127.0.0.1 given as ``_node_ip_address`` back into
    the machine's address (``services.resolve_ip_for_localhost``). Its switch for single-machine
    platforms, ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, makes the node IP the loopback address: the
    processes Ray starts read it from the environment, this one from the constant it was read into.
    Only for an instance started here: a driver joining a cluster must be reachable from it.
    """
    import ray._private.ray_constants as ray_constants

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


_REAPER: subprocess.Popen | None = None  # kept referenced: its stdin must stay open while we live


def end_with_this_process() -> None:
    """Start ``process_reaper`` (once): when this process ends, however (``kill -9`` included), the
    Ray processes it started end within about a second, not a minute or more later."""
    global _REAPER
    if _REAPER is not None or not sys.platform.startswith("linux"):
        return
    script = Path(__file__).with_name("process_reaper.py")
    _REAPER = subprocess.Popen([sys.executable, str(script), str(os.getpid())], stdin=subprocess.PIPE,
                               stdout=subprocess.DEVNULL, start_new_session=True)


# --- what the cluster can ever hold ----------------------------------------------------------


def cluster_node_types() -> list[NodeType]:
    """What the cluster can ever offer: its autoscaler's node types, else the nodes up now.
    An autoscaler whose node types cannot be read here (e.g. KubeRay's, in its own container)
    could start any node: nothing is refused then (say so), Ray Train waits for the nodes."""
    types = autoscaler_node_types()
    if types:
        return types
    nodes = [NodeType(n["NodeID"][:8], n["Resources"], 1) for n in ray.nodes() if n.get("Alive")]
    if autoscaler_running():
        print("warning: the autoscaler's node types are not readable from this node: the run is "
              "admitted and waits for the autoscaler to add the nodes it asks for", file=sys.stderr)
        return [*nodes, NodeType("autoscaler", {}, math.inf)]
    return nodes


def workers_per_node(node: dict, per_worker: dict) -> float:
    """How many workers asking ``per_worker`` one node with ``node``'s resources holds
    (an unknown node type, no resources listed, holds any number)."""
    if not node:
        return math.inf
    return min((math.floor(node.get(k, 0) / n + 1e-9) for k, n in per_worker.items() if n > 0), default=math.inf)


def worker_capacity(per_worker: dict, node_types: list[NodeType]) -> float:
    """How many workers asking ``per_worker`` all of ``node_types`` hold together."""
    holds = [(workers_per_node(t.resources, per_worker), t.max_count) for t in node_types]
    return sum(n * count for n, count in holds if n and count)  # (inf * 0 would be nan)


def placement_problem(per_worker: dict, num_workers: int, node_types: list[NodeType]) -> str:
    """Why ``num_workers`` workers asking ``per_worker`` each never fit on ``node_types``
    (each node holds whole workers), or "" when they fit."""
    asks = " + ".join(f"{n:g} {k}" for k, n in per_worker.items() if n > 0)
    if not any(workers_per_node(t.resources, per_worker) for t in node_types):
        largest = ", ".join(f"{max((t.resources.get(k, 0) for t in node_types), default=0):g} {k}"
                            for k, n in per_worker.items() if n > 0)
        return (f"one worker asks for {asks} and no node{' type' if len(node_types) > 1 else ''} of the cluster "
                f"has that much (the most any has: {largest})")
    capacity = worker_capacity(per_worker, node_types)
    if capacity < num_workers:
        return (f"scaling.num_workers={num_workers} workers of {asks} each, but its nodes (counting the "
                f"autoscaler's node types up to their max_workers) hold at most {capacity:g}")
    return ""
