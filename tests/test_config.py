import subprocess
import sys
from pathlib import Path

import pytest

from aptos_ray.config import SECTIONS, Config, ConfigError, config_from_dict, help_text, parse_args

REPO = Path(__file__).resolve().parents[1]


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
    with pytest.raises(ConfigError, match="'train.epochs': input should be a valid integer"):
        parse_args(["--train.epochs=many"])
    with pytest.raises(ConfigError, match="ambiguous"):
        parse_args(["--seed=1"])  # prepare.seed, train.seed, synthetic.seed
    empty = tmp_path / "empty_section.yaml"
    empty.write_text("model:\n")
    with pytest.raises(ConfigError, match=f"{empty}: config section 'model': input should be a dictionary"):
        parse_args(["--config", str(empty)])
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
    cfg = parse_args(["--model.name=efficientnet_b1", "--model.pretrained=none",
                      "--tune.space={'optim.lr': {'choice': [0.1]}}"])
    again = config_from_dict(cfg.to_dict())
    assert again == cfg
    cfg.save(tmp_path / "config.yaml")
    assert parse_args(["--config", str(tmp_path / "config.yaml")]) == cfg
    assert again.tune.space == {"optim.lr": {"choice": [0.1]}}


def test_shipped_configs_load():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        parse_args(["--config", str(path)])


# --- values checked at parse time (issue 16, case 9) ----------------------------------------------


@pytest.mark.parametrize("args, message", [
    (["--train.epochs=0"], "'train.epochs': input should be greater than or equal to 1, got 0"),
    (["--train.batch_size=0"], "'train.batch_size': input should be greater than or equal to 1, got 0"),
    (["--optim.lr=-0.001"], "'optim.lr': input should be greater than 0, got -0.001"),
    (["--optim.lr=0"], "'optim.lr': input should be greater than 0"),
    (["--optim.scheduler=cosin"], "'optim.scheduler': input should be 'cosine', 'step' or 'none', got 'cosin'"),
    (["--data.sampling=balanced"], "'data.sampling': input should be 'none', 'inverse' or 'sqrt'"),
    (["--model.head=ordinal"], "'model.head': input should be 'regression' or 'classification'"),
    (["--data.materialize=maybe"], "'data.materialize' must be one of true, false, auto, got 'maybe'"),
    (["--model.name=efficientnet_bx", "--model.pretrained=none"], "model.name: 'efficientnet_bx' is not a timm model"),
    (["--model.name=efficientnet_b0"], "holds weights for timm's 'tf_efficientnet_lite0'"),  # default weights
    (["--model.name=auto", "--model.pretrained=none"], "model.name=auto picks the model from a weights package"),
    (["--model.pretrained=no_such_weights_package"], "no weights package or file 'no_such_weights_package'"),
    (["--model.batch_norm=frozen", "--model.pretrained=none", "--model.name=test_efficientnet"],
     "model.batch_norm=frozen keeps the pretrained BatchNorm statistics"),
    (["--data.image_size=7"], "'data.image_size' must be 0 or >= 32, got 7"),
    (["--data.folds=3", "--data.fold=3"], "data.fold must be 0..2 with data.folds=3, got 3"),
    (["--scaling.num_workers=0"], "'scaling.num_workers': input should be greater than or equal to 1, got 0"),
    (["--prepare.val_fraction=1"], "'prepare.val_fraction': input should be less than 1"),
    (["--prepare.val_fraction=0.5", "--prepare.test_fraction=0.5"], "no training images left"),
    (["--model.drop_rate=1.5"], "'model.drop_rate': input should be less than 1"),
    (["--predict.tta=9"], "'predict.tta': input should be less than or equal to 7"),
    (["--tune.grace_period=5", "--train.epochs=3"], "tune.grace_period must be <= train.epochs=3"),
    (["--tune.space={'optim.lr': {'uniform': [0, 0.01]}}"],
     r"tune.space\['optim.lr'\]: config key 'optim.lr': input should be greater than 0"),
    (["--train.output=/proc/aptos"], "'train.output': '/proc/aptos' is inside /proc"),
])
def test_bad_values_fail_at_parse_time_naming_the_key(args, message):
    with pytest.raises(ConfigError, match=message):
        parse_args(args, sections=SECTIONS)  # as the tune job: every rule


def test_explain_without_grad_cam_is_one_line_naming_the_extra(monkeypatch):
    from aptos_ray import config_checks

    found = config_checks.importlib.util.find_spec
    monkeypatch.setattr(config_checks.importlib.util, "find_spec",
                        lambda name: None if name == "pytorch_grad_cam" else found(name))
    with pytest.raises(ConfigError, match=r"predict.explain needs pytorch_grad_cam: pip install 'aptos-ray\[explain\]'"):
        parse_args(["--predict.explain=2"], sections=["predict"])
    parse_args(["--predict.explain=0"], sections=["predict"])


def test_output_below_a_file_is_refused(tmp_path):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ConfigError, match="'train.output': '.*a_file/runs' is below the file"):
        parse_args([f"--train.output={tmp_path}/a_file/runs"])
    parse_args([f"--train.output={tmp_path}/new/runs"])  # a folder still to be made is fine


def test_zero_image_size_means_the_models_default_and_edge_values_pass():
    parse_args(["--train.epochs=1"])  # tune.grace_period=2 > 1 matters to a search only
    cfg = parse_args(["--data.image_size=0", "--train.epochs=1", "--tune.grace_period=1",
                      "--prepare.val_fraction=0", "--optim.gamma=1", "--scaling.max_failures=-1"])
    assert cfg.data.image_size == 0 and cfg.prepare.val_fraction == 0.0


def test_yaml_1_1_exponents_are_numbers_in_files_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  lr: 3e-4\ntune:\n  space: {optim.lr: {loguniform: [1e-5, 1e-3]}}\n")
    cfg = parse_args(["--config", str(path)])
    assert cfg.optim.lr == 3e-4 and cfg.tune.space["optim.lr"]["loguniform"] == [1e-5, 1e-3]
    assert parse_args(["--optim.weight_decay=5e-5"]).optim.weight_decay == 5e-5
    assert parse_args(["--train.name=1e3"]).train.name == "1e3"  # text keys take the text as typed
    assert parse_args(["--train.name=off"]).train.name == "off"  # not YAML 1.1's False


def test_validation_only_of_the_sections_a_job_reads():
    """predict reads the checkpoint's model: a default that does not fit the model is no error there."""
    args = ["--model.name=efficientnet_b0"]  # with the default Lite0 weights package
    with pytest.raises(ConfigError, match="tf_efficientnet_lite0"):
        parse_args(args)
    parse_args(args, sections=["predict", "scaling"])


# --- --help comes from the typed config ------------------------------------------------------------


def test_every_field_has_a_help_line_type_and_default():
    text = help_text()
    for section, cls in SECTIONS.items():
        for name, info in cls.__pydantic_fields__.items():
            assert info.description, f"{section}.{name} has no description in aptos_ray/config.py"
            assert f"--{section}.{name}=" in text
    assert "--optim.scheduler={cosine,step,none}  [default: cosine]" in text
    assert "--train.epochs=INT (>= 1)  [default: 10]" in text
    assert "--data.image_size=INT (0 or >= 32)  [default: 0]" in text
    assert "--data.materialize={true,false,auto}  [default: auto]" in text
    assert "--prepare.val_fraction=FLOAT (>= 0 and < 1)  [default: 0.15]" in text
    assert "StepLR decay" in text  # the field's description


def test_bad_value_exits_2_before_torch_or_ray_is_imported():
    code = ("import sys\nfrom aptos_ray.cli import run_job\ntry:\n    run_job('train', ['--optim.scheduler=cosin'])\n"
            "except SystemExit as e:\n    print(e.code, 'torch' in sys.modules, 'ray' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.stdout.split() == ["2", "False", "False"], proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: config key 'optim.scheduler': input should be 'cosine', 'step' or 'none', got 'cosin'"]


def test_a_checkpoint_saved_with_the_removed_keys_still_reads(capsys):
    saved = Config().to_dict()
    saved["model"]["num_classes"] = 5  # every config.yaml saved before the keys went
    saved["train"]["amp"] = True
    assert config_from_dict(saved) == Config()
    assert "model.num_classes, train.amp no longer exist: ignored" in capsys.readouterr().err
    saved["train"]["epochs"] = 0  # a wrong value is still refused
    with pytest.raises(ConfigError, match="saved config: config key 'train.epochs'"):
        config_from_dict(saved)
    for key in ("model.num_classes=3", "train.amp=false"):
        with pytest.raises(ConfigError, match=f"unknown config key '{key.split('=')[0]}'"):
            parse_args([f"--{key}"])  # typed by a person, it is an unknown key
