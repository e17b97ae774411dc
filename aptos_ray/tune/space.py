"""``tune.space``: a dotted config key -> ``{kind: args}`` mapping, turned into Ray Tune domains.

The space is checked in ``aptos_ray.config_checks.check_tune_space`` (every value it can produce
against the config field it sets, the keys the recipe really uses; an empty space is the default
one), so a bad space fails on the command line, before Ray starts.
"""

from __future__ import annotations

from typing import Any

from ray import tune as ray_tune

from aptos_ray.config import Config
from aptos_ray.config_checks import check_tune_space


def _domain(kind: str, args: Any):
    """A checked ``(kind, args)`` spec -> a Ray Tune domain."""
    if kind == "choice":
        return ray_tune.choice(args)
    if kind == "grid":  # every value, each tune.num_samples times (random search only)
        return ray_tune.grid_search(args)
    if kind == "randint":  # Tune's randint excludes high
        return ray_tune.randint(*args)
    return ray_tune.loguniform(*args) if kind == "loguniform" else ray_tune.uniform(*args)


def search_space(cfg: Config) -> dict[str, Any]:
    """``tune.space`` -> Ray Tune domains keyed by the full dotted config key ('lr' -> 'optim.lr')."""
    return {key: _domain(kind, args) for key, (kind, args) in check_tune_space(cfg).items()}


def plain(value: Any) -> Any:
    """numpy scalars (from Tune's samplers) -> Python ones, which the typed config accepts."""
    return value.item() if hasattr(value, "item") else value
