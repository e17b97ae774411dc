#!/usr/bin/env python
"""Build the cluster image (cluster/Dockerfile): Ray's image with this package and the pinned
torch/torchvision/timm already installed, so no node pip-installs them per job.

    python3 scripts/cluster_image.py [--variant gpu|cpu] [--image REPO] [--print]

The versions are read from pyproject.toml (the `cluster` extra: the one place they are written);
the tag is `<image>:<project version>-<variant>`, the tag cluster/aws.yaml and cluster/kuberay/
reference (tests/test_cluster.py checks both). Needs Docker; `--print` only shows the command.
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
IMAGE = "ghcr.io/your-org/aptos-ray"  # push it where your nodes can pull from
# Extra package index per variant for torch/torchvision: "" is PyPI's default Linux wheels (CUDA).
TORCH_INDEX = {"gpu": "", "cpu": "https://download.pytorch.org/whl/cpu"}


def project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def cluster_pins() -> dict[str, str]:
    """{'torch': '2.14.1', 'ray': '2.60.0', ...} from the `cluster` extra."""
    pins = {}
    for requirement in project()["optional-dependencies"]["cluster"]:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)(\[[^\]]*\])?==([^;\s]+)", requirement.replace(" ", ""))
        if not match:
            raise ValueError(f"pyproject.toml: cluster extra: {requirement!r} is not NAME==VERSION")
        pins[match[1].lower()] = match[3]
    return pins


def image_tag(variant: str, image: str = IMAGE) -> str:
    return f"{image}:{project()['version']}-{variant}"


def build_command(variant: str, image: str = IMAGE) -> list[str]:
    cmd = ["docker", "build", "-f", "cluster/Dockerfile",
           "--build-arg", f"RAY_VERSION={cluster_pins()['ray']}", "--build-arg", f"VARIANT={variant}"]
    if TORCH_INDEX[variant]:
        cmd += ["--build-arg", f"TORCH_INDEX={TORCH_INDEX[variant]}"]
    return [*cmd, "-t", image_tag(variant, image), "."]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variant", choices=sorted(TORCH_INDEX), default="gpu",
                        help="gpu: Ray's CUDA image, PyPI's CUDA torch; cpu: Ray's CPU image, CPU torch")
    parser.add_argument("--image", default=IMAGE, help="image repository (registry/name)")
    parser.add_argument("--print", action="store_true", help="print the docker command, do not run it")
    args = parser.parse_args(argv)
    cmd = build_command(args.variant, args.image)
    print(shlex.join(cmd), flush=True)
    return 0 if args.print else subprocess.run(cmd, cwd=REPO).returncode


if __name__ == "__main__":
    sys.exit(main())
