"""What ``--resume`` continues with: the config the run (or cross-validation) started with, saved in its
``config.yaml``, with only what the resuming command line sets on top, and only where that cannot change
what the run's checkpoints mean. No torch, no Ray: the command line rebuilds and checks the config
before a job starts, and writes nothing before it has decided.
"""

from __future__ import annotations

from typing import Any

import yaml

from aptos_ray import config as ct
from aptos_ray import storage
from aptos_ray.config import Config, config_from_dict, parse_args
from aptos_ray.data.embedded import LOOK_KEYS
from aptos_ray.errors import ConfigError, MissingFileError
from aptos_ray.ownership import fresh_name, latest_name

CONFIG_FILE = "config.yaml"

# How a run is carried out, not what it computes: a resume may change these. (predict and tune are
# read by other jobs; scaling says where the same run goes on.)
HOW_SECTIONS = ("scaling", "predict", "tune")
HOW_KEYS = frozenset({
    "train.local", "train.resume", "train.progress", "train.keep_checkpoints", "train.eval_batch_size",
    "train.tracking", "train.tracking_uri", "train.threads", "train.deterministic", "train.channels_last",
    "data.read_batch_size", "data.prefetch_batches", "data.materialize", "cv.max_concurrent_folds",
    # where the run is: found by them, so the same folder even when it was moved since
    "train.output", "train.name", "cv.output", "cv.name",
    # cut-points are decided after training: a finished cross-validation may be re-decided by another rule
    "cv.cut_rule",
})
# How to make a dataset that is missing: training takes the preprocessing from the dataset's manifest
# (a re-prepared dataset is caught there, ``check_same_preprocessing``), so these change nothing.
IGNORED_SECTIONS = ("synthetic", "prepare")


def run_name(cfg: Config) -> str:
    """The run's name: given, the latest run under train.output for --resume, or a fresh timestamp."""
    if cfg.train.name:
        return cfg.train.name
    if cfg.train.resume:
        name = latest_name(cfg.train.output, CONFIG_FILE)
        if name is None:
            raise MissingFileError(f"--resume: no run found under {cfg.train.output}; pass --train.name")
        return name
    return fresh_name(storage.absolute(cfg.train.output), "run")


def read_saved_config(path: str, what: str = "run") -> Config:
    """The config a run (or a cross-validation, ``what``) saved when it started."""
    if not storage.exists(path):
        raise MissingFileError(f"--resume: {storage.parent(path)} holds no {what} to resume (no {CONFIG_FILE})")
    try:
        return config_from_dict(ct.yaml_load(storage.read_text(path)))  # the loader that refuses alias bombs
    except (yaml.YAMLError, ConfigError, AttributeError) as e:
        raise ConfigError(f"--resume: {path} cannot be read back ({ct.cut(str(e).splitlines()[0])})") from None


def _values(cfg: Config) -> dict[str, Any]:
    out = {f"{s}.{k}": v for s, values in cfg.to_dict().items() for k, v in values.items()}
    out["data.dataset"] = storage.absolute(out["data.dataset"])  # as typed, or as the run saved it
    return out


def refused_changes(saved: Config, cfg: Config, may_grow: tuple[str, ...] = ()) -> list[str]:
    """``key=new (was saved)`` for every key in which ``cfg`` differs from ``saved`` that a resume may
    not change; ``may_grow`` keys may only grow."""
    before, after = _values(saved), _values(cfg)
    refused = []
    for key, value in after.items():
        section = key.split(".")[0]
        if value == before[key] or key in HOW_KEYS or section in HOW_SECTIONS + IGNORED_SECTIONS:
            continue
        if key in may_grow and value > before[key]:
            continue
        refused.append(f"{key}={ct.cut(ct.value_text(value))} (was {ct.cut(ct.value_text(before[key]))})")
    return refused


def check_resume(saved: Config, cfg: Config, where: str, may_grow: tuple[str, ...] = ("train.epochs",)) -> None:
    """ConfigError naming every key ``cfg`` changes that a resume of ``where`` may not."""
    refused = refused_changes(saved, cfg, may_grow)
    if refused:
        grow = f" ({', '.join(may_grow)} may only grow)" if any(r.split("=")[0] in may_grow for r in refused) else ""
        raise ConfigError(f"--resume: {where} started with another config; a resume may not change "
                          f"{'; '.join(refused)}{grow}. Start a new run to change them")


def check_same_preprocessing(trained: dict | None, manifest: dict, dataset: str) -> None:
    """A resume refuses a dataset prepared again, with other pixels, since its checkpoints were trained
    (``trained``: the newest checkpoint's preprocessing; None, unknown: not checked)."""
    now = manifest.get("config") or {}
    differ = [f"prepare.{k}: {trained[k]!r} -> {now[k]!r}" for k in LOOK_KEYS
              if trained is not None and k in now and k in trained and now[k] != trained[k]]
    if differ:
        raise ConfigError(f"--resume: {dataset} was prepared again since the run's checkpoints were trained "
                          f"({'; '.join(differ)})")


def resumed_config(cfg: Config, argv: list[str], sections: tuple[str, ...]) -> Config:
    """``--resume``: the run's (or cross-validation's, with ``cv`` in ``sections``) saved config with the
    command line ``argv`` applied on top, checked; ``cfg`` unchanged without --resume."""
    if not cfg.train.resume:
        return cfg
    if "cv" in sections:
        if not cfg.cv.name:
            raise ConfigError("--resume: pass --cv.name of the cross-validation to continue")
        output, name, may_grow = storage.absolute(cfg.cv.output), cfg.cv.name, ()
    else:
        output, name, may_grow = storage.absolute(cfg.train.output), run_name(cfg), ("train.epochs",)
    folder = storage.join(output, name)
    saved = read_saved_config(storage.join(folder, CONFIG_FILE), "cross-validation" if "cv" in sections else "run")
    resumed = parse_args(argv, base=config_from_dict(saved.to_dict()), sections=sections)
    if "cv" in sections:
        resumed.cv.output, resumed.cv.name = output, name
    else:
        resumed.train.output, resumed.train.name = output, name
    check_resume(saved, resumed, folder, may_grow)
    return resumed
