"""``python -m aptos_ray JOB [--key=value ...]``: the same jobs as ``jobs/JOB.py`` and ``aptos-ray JOB``."""

from aptos_ray.cli import main

main()
