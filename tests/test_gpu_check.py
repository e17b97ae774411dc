"""benchmarks/gpu_check.sh on a machine without CUDA: it must not pass a GPU that torch cannot use."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_a_gpu_that_nvidia_smi_sees_but_torch_cannot_use_fails_the_check(tmp_path):
    # A driver that lists a GPU while torch (built for another CUDA, say) sees none: before this,
    # the check skipped every GPU test and exited 0, as on a machine without a GPU.
    fake = tmp_path / "bin" / "nvidia-smi"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H200 (UUID: GPU-0)'\n")
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake.parent}:{os.environ['PATH']}", "PYTHON": sys.executable,
           "SITE": str(tmp_path / "site"), "STASH": str(tmp_path / "stash"), "WHEELS": str(tmp_path / "none")}
    done = subprocess.run(["bash", "benchmarks/gpu_check.sh", "noray"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 3, done.stdout + done.stderr
    (line,) = [line for line in done.stdout.splitlines() if "GPU check FAILED" in line]
    assert "nvidia-smi sees GPU 0: NVIDIA H200" in line and "sees no CUDA device" in line
    assert "part 1" not in done.stdout  # stopped before any test or table
