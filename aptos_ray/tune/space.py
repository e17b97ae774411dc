"""``tune.space``: a dotted config key -> ``{kind: args}`` mapping, checked and turned into Ray Tune domains.

Each value a space can produce is checked against the config field it sets, as a YAML file or a
``--key=value`` would be, so a bad space fails before any trial starts.
"""

from __future__ import annotations

from typing import Any

from ray import tune as ray_tune

from aptos_ray.config import Config, ConfigError, resolve_key, set_value

SPEC_KINDS = ("loguniform", "uniform", "choice", "randint", "grid")
# Fields every trial sets itself, or that only the search driver reads.
NOT_SEARCHABLE = {"train.name", "train.output", "train.resume", "train.local", "train.epochs", "scaling.address"}


def _check_values(key: str, values: list) -> None:
    """Each value must be one the config field accepts (same check as a YAML file or --key=value)."""
    scratch = Config()
    for value in values:
        try:
            set_value(scratch, key, value)
        except ConfigError as e:
            raise ConfigError(f"tune.space['{key}']: {e}") from None


def _domain(key: str, spec: Any):
    """One ``{"kind": args}`` spec -> a Ray Tune domain, with a clear error for a bad one."""
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in SPEC_KINDS:
        raise ConfigError(f"tune.space['{key}'] must be one of {{kind: args}} with kind in "
                          f"{', '.join(SPEC_KINDS)}; got {spec!r}")
    kind, args = next(iter(spec.items()))
    if kind in ("choice", "grid"):
        if not isinstance(args, list) or not args:
            raise ConfigError(f"tune.space['{key}']: {kind} needs a non-empty list, got {args!r}")
        _check_values(key, args)
        # grid: every value, each tune.num_samples times (random search only)
        return ray_tune.choice(args) if kind == "choice" else ray_tune.grid_search(args)
    if not (isinstance(args, list) and len(args) == 2 and all(isinstance(a, (int, float)) for a in args)):
        raise ConfigError(f"tune.space['{key}']: {kind} needs [low, high], got {args!r}")
    low, high = args
    if not low < high:
        raise ConfigError(f"tune.space['{key}']: {kind} needs low < high, got {args!r}")
    if kind == "randint":  # Tune's randint excludes high
        _check_values(key, [int(low), int(high) - 1])
        return ray_tune.randint(int(low), int(high))
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"tune.space['{key}']: loguniform needs low > 0, got {args!r}")
    _check_values(key, [float(low), float(high), (low + high) / 2.0])
    return ray_tune.loguniform(low, high) if kind == "loguniform" else ray_tune.uniform(low, high)


def search_space(space: dict) -> dict[str, Any]:
    """``tune.space`` -> Ray Tune domains keyed by the full dotted config key ('lr' -> 'optim.lr')."""
    if not isinstance(space, dict) or not space:
        raise ConfigError("tune.space is empty: give at least one 'section.key: {kind: args}'")
    domains = {}
    for key, spec in space.items():
        section, name = resolve_key(str(key))
        full = f"{section}.{name}"
        if section == "tune" or full in NOT_SEARCHABLE:
            raise ConfigError(f"tune.space: '{full}' cannot be searched (the search sets it itself)")
        domains[full] = _domain(full, spec)
    return domains


def plain(value: Any) -> Any:
    """numpy scalars (from Tune's samplers) -> Python ones, which the typed config accepts."""
    return value.item() if hasattr(value, "item") else value
