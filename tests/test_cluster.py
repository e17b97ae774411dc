"""From one machine to a cluster: the cluster configs (cluster/) parse and agree with the installed
Ray and the code, they run the cluster image (cluster/Dockerfile) whose pins are written once in
pyproject.toml, nothing in them is a secret or listens on every interface, checkpoints load with
weights_only, training runs through Ray on file:// URIs standing in for s3://, and (slow) a real
two-node run on this machine (scripts/two_node_run.py)."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
import yaml
from helpers import write_split

from aptos_ray.config import parse_args
from aptos_ray.train.driver import run_name, train

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
KUBERAY = sorted((CLUSTER / "kuberay").glob("*.yaml"))
CONFIG_FILES = sorted(CLUSTER.rglob("*.yaml"))
DOCKERFILE = CLUSTER / "Dockerfile"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


IMAGE = load_script("cluster_image")  # the image's tag and build command, read from pyproject.toml


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def walk(node, key=""):
    """Every (key, value) of a nested YAML document, lists included."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield k, v
            yield from walk(v, k)
    elif isinstance(node, list):
        for item in node:
            yield from walk(item, key)


def containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def job_args(entrypoint: str) -> tuple[str, list[str]]:
    """'python jobs/X.py --a=b ...' -> ('jobs/X.py', ['--a=b', ...])."""
    argv = shlex.split(entrypoint)
    assert argv[0] == "python", entrypoint
    return argv[1], argv[2:]


def image_variant(image: str) -> str:
    """'gpu' or 'cpu' for the cluster image's tags; anything else is not the cluster image."""
    variants = [v for v in ("gpu", "cpu") if image == IMAGE.image_tag(v)]
    assert variants, f"{image}: not the cluster image ({IMAGE.image_tag('gpu')} or {IMAGE.image_tag('cpu')})"
    return variants[0]


def installs_nothing(doc) -> None:
    """No pip/conda list and no `pip install` anywhere in a config: the image has the dependencies."""
    for key, value in walk(doc):
        assert key not in ("pip", "conda", "uv"), f"{key}: {value}"
        assert not (isinstance(value, str) and re.search(r"\bpip3? install|\btorch\b", value)), value


# --- configs ------------------------------------------------------------------------------------


def test_cluster_folder_has_launcher_kuberay_and_runtime_env():
    names = {p.relative_to(CLUSTER).as_posix() for p in CONFIG_FILES}
    assert {"aws.yaml", "runtime_env.yaml", "kuberay/raycluster.yaml", "kuberay/rayjob-train.yaml",
            "kuberay/rayjob-tune.yaml"} <= names


def test_launcher_config_is_valid_for_the_installed_ray():
    import jsonschema

    config = load(CLUSTER / "aws.yaml")
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)  # the schema `ray up` checks against
    docker = config["docker"]
    assert image_variant(docker["image"]) == "gpu" and image_variant(docker["head_image"]) == "cpu"
    workers = {k: v for k, v in config["available_node_types"].items() if k != config["head_node_type"]}
    assert workers, "no worker node type"
    for node in workers.values():
        assert 0 <= node["min_workers"] <= node["max_workers"] <= config["max_workers"]
        assert node["node_config"]["InstanceType"].startswith(("g5.", "g6.", "g4dn.", "p3.", "p4d.", "p5."))
    installs_nothing(config)  # the image has Ray, torch and the package; jobs bring the code
    assert set(config["file_mounts"]) == {"~/.ray/auth_token"}
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    for cmd in (head_start, " ".join(config["worker_start_ray_commands"])):
        assert "RAY_AUTH_MODE=token ray start" in cmd  # every node in token mode, not only the head


def test_kuberay_manifests_match_ray_and_the_code():
    for path in KUBERAY:
        doc = load(path)
        assert doc["apiVersion"] == "ray.io/v1", path
        assert doc["kind"] in {"RayCluster", "RayJob"}, path
        cluster = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
        assert cluster["rayVersion"] == ray.__version__ == IMAGE.cluster_pins()["ray"], path
        assert cluster["authOptions"]["mode"] == "token", path
        assert cluster["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP", path
        head = containers(cluster["headGroupSpec"]["template"])
        groups = cluster["workerGroupSpecs"]
        assert groups, path
        assert [image_variant(c["image"]) for c in head] == ["cpu"], path
        for g in groups:
            assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], (path, g["groupName"])
            for c in containers(g["template"]):
                limits = c["resources"]["limits"]
                assert str(limits["nvidia.com/gpu"]) == "1" and image_variant(c["image"]) == "gpu"
        if doc["kind"] == "RayJob":
            script, args = job_args(doc["spec"]["entrypoint"])
            assert (REPO / script).is_file(), f"{path}: entrypoint {script} is not in the repository"
            cfg = parse_args(args)  # every --key=value is a real config key of the right type
            assert cfg.scaling.use_gpu and cfg.data.dataset.startswith(("s3://", "gs://"))
            assert cfg.train.output.startswith(("s3://", "gs://")) or cfg.tune.output.startswith(("s3://", "gs://"))
            env = yaml.safe_load(doc["spec"]["runtimeEnvYAML"])
            assert env["working_dir"].startswith(("https://", "s3://", "gs://")), \
                "the submitter pod has no checkout: working_dir must be a remote zip"
            assert set(env) == {"working_dir"}, f"{path}: the image brings dependencies and environment"
        installs_nothing(doc)
    scripts = {job_args(load(p)["spec"]["entrypoint"])[0] for p in KUBERAY if load(p)["kind"] == "RayJob"}
    assert scripts == {"jobs/train.py", "jobs/tune.py"}


def test_gpu_nodes_pin_a_driver_that_runs_the_torch_cuda_build():
    """The pinned torch from PyPI is a CUDA 13 build (driver R580+): every GPU node of every cluster
    file asks for such a driver (launcher: a named AMI; KubeRay: node affinity on the driver label),
    the image says so, and docs/CLUSTER.md names it. Ray's default AMI has an older driver."""
    from aptos_ray.ray_setup import MIN_DRIVER_FOR_CUDA_13

    assert IMAGE.cluster_pins()["torch"].startswith("2.14"), "torch changed: check its CUDA build and the driver pins"
    aws = load(CLUSTER / "aws.yaml")
    for name, node_type in aws["available_node_types"].items():
        image = node_type["node_config"].get("ImageId", "")
        assert image.startswith("ami-") or "base-oss-nvidia-driver-gpu" in image, f"aws.yaml {name}: no AMI pinned"
    for path in KUBERAY:
        doc = load(path)
        cluster = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
        for g in cluster["workerGroupSpecs"]:
            terms = g["template"]["spec"]["affinity"]["nodeAffinity"][
                "requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
            needs = [e for t in terms for e in t["matchExpressions"] if e["key"] == "nvidia.com/cuda.driver.major"]
            assert needs and all(e["operator"] == "Gt" and int(e["values"][0]) == MIN_DRIVER_FOR_CUDA_13 - 1
                                 for e in needs), (path, g["groupName"])
    assert f'nvidia-driver-min="{MIN_DRIVER_FOR_CUDA_13}"' in DOCKERFILE.read_text()
    assert f"R{MIN_DRIVER_FOR_CUDA_13}" in (REPO / "docs" / "CLUSTER.md").read_text()


@pytest.mark.parametrize("cuda, init_error, reason", [
    ("13.0", RuntimeError("The NVIDIA driver on your system is too old (found version 12040).\nPlease update"),
     "The NVIDIA driver on your system is too old (found version 12040). Please update"),
    (None, None, "this torch is a CPU build"),
])
def test_a_gpu_ray_assigned_that_torch_cannot_use_is_one_line(monkeypatch, cuda, init_error, reason):
    from aptos_ray.errors import GpuUnusableError
    from aptos_ray.ray_setup import check_assigned_gpus_usable

    def init():
        raise init_error

    monkeypatch.setattr(ray, "get_gpu_ids", lambda: [0])
    monkeypatch.setattr(ray.util, "get_node_ip_address", lambda: "10.0.0.7")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "init", init)
    monkeypatch.setattr(torch.version, "cuda", cuda)
    with pytest.raises(GpuUnusableError) as e:
        check_assigned_gpus_usable("Ray Train worker")
    message = str(e.value)
    assert "\n" not in message and message.startswith("Ray assigned GPU 0 to this Ray Train worker on node 10.0.0.7")
    assert reason in message and "R580 or newer" in message
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: [])
    check_assigned_gpus_usable("Ray Train worker")  # no GPU assigned: nothing to check


def test_runtime_env_uploads_the_code_and_not_data_or_runs(tmp_path):
    from ray._private.runtime_env.packaging import (  # Ray's own matcher
        _dir_travel,
        _get_excludes,
    )
    from ray.runtime_env import RuntimeEnv

    env = load(CLUSTER / "runtime_env.yaml")
    RuntimeEnv(**env)  # Ray validates every field
    assert env["working_dir"] == "."
    assert set(env) == {"working_dir", "excludes"}, "only the code travels with a job; the image has the rest"
    files = ["jobs/train.py", "aptos_ray/loop.py", "configs/demo.yaml", "tests/data/keep.txt",
             "data/prepared/x/train/part-0.parquet", "runs/r/checkpoint_epoch_0000/model.pt",
             "tune_runs/t/tuner.pkl", "outputs/predict/submission.csv", ".venv/bin/python", ".git/HEAD"]
    for f in files:
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f).write_text("x")
    uploaded = []
    # include_gitignore=False: the excludes alone must keep data and runs out
    _dir_travel(tmp_path, [_get_excludes(tmp_path, env["excludes"])],
                lambda p: uploaded.append(p.relative_to(tmp_path).as_posix()) if p.is_file() else None,
                include_gitignore=False)
    assert sorted(uploaded) == ["aptos_ray/loop.py", "configs/demo.yaml", "jobs/train.py", "tests/data/keep.txt"]


# --- the cluster image -----------------------------------------------------------------------------


def pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def test_dockerfile_installs_the_cluster_extra_and_restates_no_version():
    from aptos_ray.ray_setup import RAY_ENV

    code = "\n".join(line for line in DOCKERFILE.read_text().splitlines() if not line.lstrip().startswith("#"))
    assert not re.search(r"\d+\.\d+|==|~=|>=", code), "versions are pyproject.toml's (the `cluster` extra)"
    assert re.search(r"^FROM rayproject/ray:\$\{RAY_VERSION\}-py3\d+-\$\{VARIANT\}$", code, re.M)
    assert re.search(r"pip install .*\[cluster\]", code)
    for key, value in RAY_ENV.items():  # what the runtime env used to set for every Ray process
        assert re.search(rf"\b{key}={value}\b", code), key
    # The build context holds exactly what the COPY lines read (and so no data, runs or .git).
    allowed = {line[1:] for line in (CLUSTER / "Dockerfile.dockerignore").read_text().split() if line.startswith("!")}
    copied = {src for line in code.splitlines() if line.startswith("COPY ")
              for src in line.split()[1:-1] if not src.startswith("--")}
    assert copied == allowed == {"pyproject.toml", "README.md", "aptos_ray"}
    for variant in ("gpu", "cpu"):
        cmd = IMAGE.build_command(variant)
        assert cmd[:4] == ["docker", "build", "-f", "cluster/Dockerfile"] and cmd[-3:] == ["-t", IMAGE.image_tag(variant), "."]
        assert f"RAY_VERSION={ray.__version__}" in cmd and f"VARIANT={variant}" in cmd
    assert "TORCH_INDEX=https://download.pytorch.org/whl/cpu" in IMAGE.build_command("cpu")
    docs = (REPO / "docs" / "CLUSTER.md").read_text()
    assert IMAGE.image_tag("gpu") in docs and IMAGE.image_tag("cpu") in docs


def test_cluster_pins_lie_in_the_core_ranges_and_are_what_is_installed():
    from importlib.metadata import version

    from packaging.requirements import Requirement
    from packaging.version import Version

    project = pyproject()
    core = {r.name: r for r in map(Requirement, project["dependencies"])}
    pins = [Requirement(d) for d in project["optional-dependencies"]["cluster"]]
    assert {pin.name for pin in pins} == {"torch", "torchvision", "timm", "ray"}
    assert IMAGE.cluster_pins() == {pin.name: str(next(iter(pin.specifier)).version) for pin in pins}
    for pin in pins:
        (spec,) = pin.specifier
        assert spec.operator == "==", pin
        if pin.name != "torchvision":  # timm's dependency, pinned only to match torch's build
            assert core[pin.name].specifier.contains(spec.version), f"{pin} is outside the core range {core[pin.name]}"
            assert pin.extras == core[pin.name].extras, pin
        installed = Version(version(pin.name)).public  # 2.14.1+cu130 -> 2.14.1: the build, not the version
        assert installed == spec.version, f"{pin.name} {installed} is installed, the cluster pin says {spec.version}"


SECRET_KEY = re.compile(r"(secret|password|passwd|api_?key|access_?key|credential|private_?key|token)", re.I)
SECRET_TEXT = re.compile(r"(AKIA[0-9A-Z]{16}|-----BEGIN [A-Z ]*PRIVATE KEY|aws_secret_access_key|"
                         r"ghp_[0-9A-Za-z]{20,}|xox[bp]-)", re.I)


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.relative_to(CLUSTER).as_posix())
def test_no_credentials_in_cluster_configs(path):
    text = path.read_text()
    assert not SECRET_TEXT.search(text), f"{path}: looks like a credential"
    for key, value in walk(yaml.safe_load(text)):
        if isinstance(key, str) and SECRET_KEY.search(key):
            # a key naming a secret may point at one (a file path, a secretKeyRef), never hold one
            assert not isinstance(value, str) or value.startswith(("~/", "/")), f"{path}: {key}: {value!r}"
        if key == "env":
            for var in value:
                if SECRET_KEY.search(var["name"]):
                    assert "valueFrom" in var and "value" not in var, f"{path}: env {var['name']} holds a value"


def test_nothing_listens_on_every_interface():
    for path in [*CONFIG_FILES, DOCKERFILE, *(REPO / "scripts").glob("*_node_run.py")]:
        assert "0.0.0.0" not in path.read_text(), f"{path}: binds every interface"


def test_two_node_script_binds_localhost_and_uses_its_own_temp_dir_and_token(tmp_path):
    spec = importlib.util.spec_from_file_location("two_node_run", REPO / "scripts" / "two_node_run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cluster = module.TwoNodeCluster(tmp_path)
    assert "--dashboard-host=127.0.0.1" in cluster.head_cmd
    assert f"--temp-dir={tmp_path / 'ray'}" in cluster.head_cmd
    assert any(a.startswith(f"--temp-dir={tmp_path}") for a in cluster.worker_cmd)
    assert cluster.env["RAY_AUTH_MODE"] == "token"
    token = Path(cluster.env["RAY_AUTH_TOKEN_PATH"])
    assert token.parent == tmp_path and oct(token.stat().st_mode & 0o777) == "0o600"
    assert os.environ.get("RAY_AUTH_TOKEN_PATH") != str(token)  # nothing leaks into this process before start()


def test_every_torch_load_uses_weights_only():
    """A checkpoint is data: torch.load must never unpickle code (weights_only=True)."""
    offenders = []
    for folder in ("aptos_ray", "jobs", "scripts", "benchmarks", "tests"):
        for path in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                        and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
                    safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                               for k in node.keywords)
                    if not safe:
                        offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not offenders, f"torch.load without weights_only=True: {offenders}"


# --- URIs ---------------------------------------------------------------------------------------


def test_resume_finds_the_latest_run_under_a_uri(tmp_path):
    for name in ("older", "newer"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.yaml").write_text("{}\n")
        os.utime(tmp_path / name / "config.yaml", (1e9, 1e9 if name == "older" else 2e9))
    (tmp_path / "not-a-run").mkdir()
    assert run_name(parse_args([f"--train.output=file://{tmp_path}", "--resume"])) == "newer"
    with pytest.raises(FileNotFoundError, match="no run found"):
        run_name(parse_args([f"--train.output=file://{tmp_path}/missing", "--resume"]))


def random_dataset(out: Path, per_grade: int = 8, size: int = 32) -> Path:
    """A prepared dataset of noise images: enough to run the pipeline, no shared data needed."""
    rng = np.random.default_rng(0)
    counts = {}
    for split, n in (("train", per_grade), ("val", per_grade // 2)):
        grades = [g for g in range(5) for _ in range(n)]
        images = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in grades]
        write_split(out, split, [f"{split}_{i}" for i in range(len(grades))], grades, images)
        counts[split] = {str(g): n for g in range(5)}
    (out / "manifest.json").write_text(json.dumps({"format_version": 1, "encoding": "raw", "image_size": size,
                                                   "counts": counts}))
    return out


@pytest.mark.slow  # CI's budget: tests/test_uri.py's end-to-end run trains from and into an S3 bucket
@pytest.mark.ray
def test_ray_training_reads_and_writes_uris(tmp_path, ray_session):
    """Data and runs as file:// URIs (what s3:// or gs:// would be on a cluster) through Ray Train."""
    dataset = random_dataset(tmp_path / "prepared")
    args = ["--model.name=test_efficientnet", "--model.pretrained=none", "--model.head=classification",
            "--data.image_size=32", "--train.batch_size=8",
            "--train.progress=false", "--train.epochs=1", "--scaling.num_workers=1",
            f"--data.dataset=file://{dataset}", f"--train.output=file://{tmp_path}/runs", "--train.name=uri"]
    summary = train(parse_args(args))
    assert summary["run_dir"] == f"file://{tmp_path}/runs/uri"
    assert summary["best_checkpoint"] == f"file://{tmp_path}/runs/uri/checkpoint_epoch_0000"
    run = tmp_path / "runs" / "uri"
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [0]
    assert (run / "summary.json").is_file() and (run / "config.yaml").is_file()
    assert (run / "plots" / "learning_curves.png").is_file()
    state = torch.load(run / "checkpoint_epoch_0000" / "model.pt", weights_only=True)
    assert state["config"]["data"]["dataset"] == f"file://{dataset}"


# --- a real two-node cluster on this machine ------------------------------------------------------


@pytest.mark.slow
@pytest.mark.ray
def test_two_node_run():
    """2-4 min on 2 shared cores: two Ray nodes, the training job submitted with 2 and 1 workers
    (real APTOS images when ../shared/data has them, else synthetic ones prepared on the cluster)."""
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "two_node_run.py")], capture_output=True,
                         text=True, timeout=600, cwd=REPO)
    print(out.stdout[-3000:])
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "2 training workers on 2 different nodes: yes" in out.stdout
    assert re.search(r"images/s, 1 worker : +\d", out.stdout) and re.search(r"images/s, 2 workers: +\d", out.stdout)
    assert "0 leftover process(es)" in out.stdout


MASKED = load_script("masked_node_run")
needs_root = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"),
                                reason="mount namespaces need root and unshare(1)")


@needs_root
def test_masked_node_sees_an_empty_folder_where_the_driver_has_files(tmp_path):
    """The prefix the masked node's `ray start` runs in: the driver's files are gone there, the code is not."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "labels.csv").write_text("id_code,diagnosis\n")
    script = f"ls -A {data}; test -f {REPO / 'aptos_ray' / 'cli.py'} && echo code-visible"
    out = subprocess.run([*MASKED.namespace_prefix([data]), "sh", "-c", script], capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["code-visible"]
    assert (data / "labels.csv").is_file()  # outside the namespace nothing changed


def test_masked_run_tells_the_clear_error_from_a_quarantine():
    from aptos_ray.errors import DriverOnlyPathError

    ran = {"masked": 3, "exit_code": 2}
    clear = f"Running entrypoint\nerror: {DriverOnlyPathError('/tmp/x/data/raw/images/a.png')}\n"
    assert MASKED.verdict(False, False, clear, ran)[0]
    quarantined = "error: /tmp/x/data/raw: empty dataset: all 50 images failed to decode (missing file: 50)\n"
    assert not MASKED.verdict(False, False, quarantined, ran)[0]
    assert not MASKED.verdict(False, False, "Traceback ...\nFileNotFoundError: x\n", {**ran, "exit_code": 1})[0]
    assert not MASKED.verdict(False, False, "Traceback (most recent call last):\n  ...\n" + clear, ran)[0]
    assert not MASKED.verdict(False, True, "quarantined 3 of 50\n", ran)[0]  # a silent success is wrong
    assert not MASKED.verdict(True, True, "done\n", {**ran, "masked": 0})[0]  # never reached the masked node
    assert MASKED.verdict(True, True, "done\n", ran)[0]


@pytest.mark.slow
@pytest.mark.ray
@needs_root
def test_masked_worker_run():
    """6-12 min on 2 shared cores: prepare, train and predict on a cluster whose second node sees an
    empty tmpfs over the data and run folders; s3:// URIs (moto) succeed, local paths fail clearly,
    and a predict of s3:// inputs into the driver's local folder succeeds."""
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "masked_node_run.py")], capture_output=True,
                         text=True, timeout=1800, cwd=REPO)
    print(out.stdout[-5000:])
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-3000:]
    rows = re.findall(r"^  (masked-\S+) +(succeed|fail clearly) +(yes|NO) ", out.stdout, re.M)
    assert len(rows) == 7 and all(ok == "yes" for *_, ok in rows), rows
    assert "2 training workers on 2 nodes: yes" in out.stdout and "0 leftover process(es)" in out.stdout
    assert "50 of 50 inputs predicted into the driver's local predict-local/" in out.stdout
