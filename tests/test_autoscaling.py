"""Admission on an autoscaling cluster: Ray's fake autoscaler on this machine (tests/autoscaling_cluster.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.ray
def test_autoscaling_cluster_admits_what_its_node_types_hold_and_starts_the_node():
    """A head with CPUs only and a GPU node type with min_workers 0: two GPU workers are admitted
    and the autoscaler starts the node for them; three (beyond max_workers' one node of 2 GPUs)
    are refused in one line before any node starts."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    run = subprocess.run([sys.executable, str(ROOT / "tests" / "autoscaling_cluster.py")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=240)
    out = run.stdout
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    lines = dict(line.split(": ", 1) for line in out.splitlines() if line.startswith(("CHECK ", "NODES ", "PLACED")))
    assert lines["NODES before"] == "1"
    refusal = lines["CHECK beyond max_workers"]
    assert refusal.startswith("ConfigError: the Ray cluster cannot fit this run: scaling.num_workers=3 workers of "
                              "1 CPU + 1 GPU each, but its nodes (counting the autoscaler's node types up to their "
                              "max_workers) hold at most 2."), refusal
    assert "\n" not in refusal
    assert lines["NODES after refusal"] == "1"  # refused before anything started
    assert lines["CHECK two GPU workers"] == "ok"
    assert lines["PLACED"] == "True; NODES: 2; GPUs: 2", out
