"""What the project takes from Ray without a public API (aptos_ray/ray_internals.py), checked against the
installed Ray: an upgrade that moves one fails here, naming the Ray version, not deep inside a run."""

from __future__ import annotations

import inspect
import logging

import pytest
import ray

MOVED = f"Ray {ray.__version__} moved it: update aptos_ray/ray_internals.py"


def test_public_ray_train_names_are_the_ones_the_project_uses():
    import ray.train

    from aptos_ray.train import ray_backend

    for name in ("UserCallback", "ControllerError", "WorkerGroupError"):
        assert getattr(ray_backend, name) is getattr(ray.train, name), f"ray.train.{name}: {MOVED}"


def test_worker_errors_are_unwrapped_from_ray_trains_wrapper():
    from aptos_ray.ray_internals import worker_error_cause

    try:
        from ray.train.v2._internal.exceptions import UserExceptionWithTraceback
    except ImportError as e:
        pytest.fail(f"UserExceptionWithTraceback: {MOVED} ({e})")
    cause = ValueError("the worker's own error")
    assert worker_error_cause(UserExceptionWithTraceback(cause, "traceback")) is cause, f"_base_exc: {MOVED}"
    assert worker_error_cause(ValueError("plain")) is None


def test_checkpoint_manager_snapshot_is_the_file_ray_train_writes():
    from aptos_ray.ray_internals import CHECKPOINT_MANAGER_SNAPSHOT

    try:
        from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME
    except ImportError as e:
        pytest.fail(f"CHECKPOINT_MANAGER_SNAPSHOT_FILENAME: {MOVED} ({e})")
    assert CHECKPOINT_MANAGER_SNAPSHOT == CHECKPOINT_MANAGER_SNAPSHOT_FILENAME, MOVED


def test_report_logger_is_the_one_ray_train_reports_through():
    from aptos_ray.ray_internals import report_logger_name

    name = report_logger_name()
    assert name, f"ray.train.v2._internal.execution.context: {MOVED}"
    from ray.train.v2._internal.execution import context

    assert context.logger is logging.getLogger(name), f"the report logger: {MOVED}"


def test_autoscaler_sources_are_where_ray_keeps_them():
    """The GCS cluster config accessor, the autoscaler's status key and its process's arguments."""
    import ray._private.state
    from ray._private import ray_constants, services

    assert callable(getattr(ray._private.state.state, "get_cluster_config", None)), f"get_cluster_config: {MOVED}"
    assert ray_constants.DEBUG_AUTOSCALING_STATUS, f"DEBUG_AUTOSCALING_STATUS: {MOVED}"
    source = inspect.getsource(services.start_monitor)
    assert '"--autoscaling-config="' in source and 'f"--gcs-address={gcs_address}"' in source, \
        f"the autoscaler's command line: {MOVED}"
    from ray.autoscaler._private.util import format_readonly_node_type

    assert format_readonly_node_type("abc") == "node_abc", f"the read-only node types: {MOVED}"


def test_an_autoscaling_config_gives_node_types_up_to_their_max_workers():
    import math

    from aptos_ray.ray_internals import NodeType, node_types_from_autoscaling_config

    types = node_types_from_autoscaling_config({
        "max_workers": 3, "head_node_type": "head",
        "available_node_types": {"head": {"resources": {"CPU": 4}, "max_workers": 0},
                                 "gpu": {"resources": {"CPU": 8, "GPU": 1}, "max_workers": 10},
                                 "cpu": {"resources": {"CPU": 2}}}})
    assert types == [NodeType("head", {"CPU": 4}, 1), NodeType("gpu", {"CPU": 8, "GPU": 1}, 3),
                     NodeType("cpu", {"CPU": 2}, 3)]
    assert node_types_from_autoscaling_config({"available_node_types": {"x": {"resources": {}}}})[0].max_count \
        == math.inf
