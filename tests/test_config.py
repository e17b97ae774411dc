import pytest

from aptos_ray.config import Config, ConfigError, config_from_dict, parse_args


def test_defaults_then_yaml_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  lr: 0.01\n  gamma: 0.5\ntrain:\n  epochs: 3\n")
    cfg = parse_args(["--config", str(path), "--optim.gamma=0.9", "--epochs=7"])
    assert cfg.optim.lr == 0.01  # from YAML
    assert cfg.optim.gamma == 0.9  # override beats YAML
    assert cfg.train.epochs == 7  # unique short key
    assert cfg.model.name == Config().model.name  # untouched default


def test_unknown_and_mistyped_keys_are_errors(tmp_path):
    with pytest.raises(ConfigError, match="optim.lrr"):
        parse_args(["--optim.lrr=0.1"])
    with pytest.raises(ConfigError, match="unknown config section 'optimm'"):
        parse_args(["--optimm.lr=0.1"])
    with pytest.raises(ConfigError, match="'train.epochs' expects int"):
        parse_args(["--train.epochs=many"])
    with pytest.raises(ConfigError, match="ambiguous"):
        parse_args(["--seed=1"])  # prepare.seed, train.seed, synthetic.seed
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  nmae: efficientnet_b3\n")
    with pytest.raises(ConfigError, match=f"{bad}.*model.nmae"):
        parse_args(["--config", str(bad)])


def test_shortcuts_and_types():
    cfg = parse_args(["--local", "--resume", "--optim.lr=1e-3", "--train.name=42"])
    assert cfg.train.local and cfg.train.resume
    assert cfg.optim.lr == pytest.approx(1e-3) and isinstance(cfg.optim.lr, float)
    assert cfg.train.name == "42"


def test_round_trip_through_dict_and_yaml(tmp_path):
    cfg = parse_args(["--model.name=efficientnet_b1", "--tune.space={'optim.lr': {'choice': [0.1]}}"])
    again = config_from_dict(cfg.to_dict())
    assert again == cfg
    cfg.save(tmp_path / "config.yaml")
    assert parse_args(["--config", str(tmp_path / "config.yaml")]) == cfg
    assert again.tune.space == {"optim.lr": {"choice": [0.1]}}


def test_shipped_configs_load():
    from pathlib import Path

    for path in sorted((Path(__file__).parents[1] / "configs").glob("*.yaml")):
        parse_args(["--config", str(path)])
