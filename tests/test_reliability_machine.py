"""The reliability corpus, when the machine fails (issue #26): full and read-only disks, an S3
endpoint that does not answer, one file under two ids, an id whose extension differs in case, and
the processes and ports of a local Ray. docs/RELIABILITY.md has the table.

Full and read-only disks are real: small tmpfs mounts (root only; skipped elsewhere). A full disk
during a Ray worker's checkpoint upload is checked on the wrapped error Ray Train hands the
callback (no Ray started); the local Ray's processes and ports in a subprocess.

| case | what | expected | test |
|---|---|---|---|
| 13 | output folder on a full disk (prepare, train, predict, export) | one line naming the key and path, "disk full", exit 2, before Ray starts | test_case13_* |
| 14 | --local checkpoint write that fills the disk | one line naming the checkpoint folder, exit 2, no checkpoint folder (not even hidden) left | test_case14_* |
| 15 | full disk in a Ray Train worker | not retried: the one-line error naming the checkpoint folder ends the run, no partial folder left | test_case15_* (one slow) |
| 16 | read-only output folder (predict, export, train) | one line "read-only file system", exit 2, before Ray starts | test_case16_* |
| 17 | S3 endpoint that does not answer (train output, prepare input) | one line "storage endpoint unreachable" naming the URI, exit 2 | test_case17_* |
| 18 | one file under two ids (`a8`, `a8.png`) | the later row quarantined "duplicate file" | test_case18_* |
| 19 | `x.png` asked, `x.PNG` there | "missing file: x.PNG exists (the name differs only in case)" | test_case19_* |
| 20 | `kill -9` of a driver that started a local Ray | its Ray processes gone within seconds; every port on 127.0.0.1 | test_case20_* (ray) |
| 21 | a file written on a disk that fills | the old file stays whole, no temporary left | test_case21_* |
| 22 | an output path that is an existing file | one line, exit 2, before the job | test_case22_* |
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import aptos_subset

from aptos_ray import ray_setup, storage
from aptos_ray.cli import run_job
from aptos_ray.config import PrepareConfig, parse_args
from aptos_ray.data.sources import read_source
from aptos_ray.errors import StorageError
from aptos_ray.train.driver import train

REPO = Path(__file__).resolve().parents[1]
TINY = ["--local", "--model.name=test_efficientnet", "--model.pretrained=none", "--data.image_size=32",
        "--train.batch_size=8", "--train.eval_batch_size=32", "--train.progress=false",
        "--optim.warmup_epochs=0"]


def _mount(folder: Path, size: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                                           capture_output=True).returncode:
        pytest.skip("needs root to mount a small tmpfs")


@pytest.fixture
def disk(tmp_path):
    """A 2 MB tmpfs at ``tmp_path/disk``: a disk that fills for real. Unmounted afterwards."""
    folder = tmp_path / "disk"
    _mount(folder, "2m")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def fill(disk: Path, leave: int = 0) -> None:
    """Fill ``disk`` until ``leave`` bytes (rounded to its blocks) are free."""
    stat = os.statvfs(disk)
    free = stat.f_bavail * stat.f_frsize
    with open(disk / ".filler", "wb") as f:
        f.write(b"\0" * max(0, free - leave))


def read_only(disk: Path) -> Path:
    """``disk/outputs`` (an empty folder) on the tmpfs, then the tmpfs remounted read-only."""
    (disk / "outputs").mkdir()
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    return disk / "outputs"


@pytest.fixture(scope="module")
def p60(aptos_dir, tmp_path_factory) -> Path:
    return aptos_subset(aptos_dir, tmp_path_factory.mktemp("p60") / "p60", per_grade=12, size=64)


@pytest.fixture(scope="module")
def one_epoch(p60, tmp_path_factory) -> Path:
    """A finished 1-epoch --local run (a real checkpoint for predict and export)."""
    out = tmp_path_factory.mktemp("runs")
    train(parse_args([*TINY, f"--data.dataset={p60}", f"--train.output={out}", "--train.name=r",
                      "--train.epochs=1"]))
    return out / "r"


@pytest.fixture
def no_ray(monkeypatch):
    """Starting Ray fails the test: the error must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started before the output was checked")
    monkeypatch.setattr(ray_setup, "init_ray", refuse)
    for module in ("aptos_ray.infer.predict", "aptos_ray.data.prepare", "aptos_ray.train.ray_backend"):
        if module in sys.modules:
            monkeypatch.setattr(sys.modules[module], "init_ray", refuse, raising=False)


def one_line_exit_2(job: str, argv: list[str], capsys) -> str:
    """Run ``job``; it must exit 2 with exactly one line on stderr, which is returned."""
    with pytest.raises(SystemExit) as exit_:
        run_job(job, argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


# ---------------------------------------------------------------- 13, 14, 15: disk full


def job_args(job: str, out: Path, p60: Path, run: Path | None, aptos_dir: Path) -> list[str]:
    return {
        "prepare": [f"--prepare.input={aptos_dir}", f"--prepare.output={out / 'prepared'}", "--prepare.limit=20"],
        "train": [*TINY, f"--data.dataset={p60}", f"--train.output={out / 'runs'}", "--train.name=x",
                  "--train.epochs=1"],
        "predict": [f"--predict.checkpoint={run}", f"--predict.images={p60}", "--predict.split=val",
                    f"--predict.output={out / 'pred'}"],
        "export": [f"--predict.checkpoint={run}", f"--predict.output={out / 'export'}"],
    }[job]


@pytest.mark.parametrize("job", ["prepare", "train", "predict", "export"])
def test_case13_full_disk_is_one_line_before_the_work(job, disk, p60, one_epoch, aptos_dir, no_ray, capsys):
    fill(disk)
    line = one_line_exit_2(job, job_args(job, disk, p60, one_epoch, aptos_dir), capsys)
    assert str(disk) in line and "disk full" in line
    assert sorted(p.name for p in disk.iterdir()) == [".filler"]  # nothing begun


def test_case14_local_checkpoint_that_fills_the_disk_leaves_nothing(disk, p60, capsys):
    fill(disk, leave=256 * 1024)  # room for the write probe and config.yaml, not for a checkpoint
    args = [*TINY, f"--data.dataset={p60}", f"--train.output={disk}", "--train.name=full", "--train.epochs=1",
            "--model.head=classification"]
    line = one_line_exit_2("train", args, capsys)
    assert "checkpoint_epoch_0000: disk full" in line and str(disk / "full") in line
    assert not [p.name for p in (disk / "full").iterdir() if "checkpoint" in p.name]


def test_case15_full_disk_in_a_ray_worker_is_not_retried():
    """Ray Train hands ``after_exception`` the worker's error wrapped; a disk-full OSError there
    becomes the one-line error that ends the run (no FailureConfig retry)."""
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback

    from aptos_ray.train.ray_backend import StopOnUserError

    cause = OSError(errno.ENOSPC, "Error writing bytes to file. Detail: [errno 28] No space left on device")
    wrapped = UserExceptionWithTraceback(cause, "Traceback ...")
    with pytest.raises(StorageError, match="disk full"):
        StopOnUserError().after_exception(None, {0: wrapped})
    # pyarrow's upload loses the errno, keeping it in its text
    with pytest.raises(StorageError, match="disk full"):
        StopOnUserError().after_exception(None, {0: UserExceptionWithTraceback(
            OSError("Failed to write. Detail: [errno 28] No space left on device"), "")})
    StopOnUserError().after_exception(None, {0: UserExceptionWithTraceback(OSError("connection reset"), "")})


@pytest.mark.ray
@pytest.mark.slow
def test_case15_ray_training_that_fills_the_disk_ends_in_one_attempt(disk, p60):
    """The real thing: Ray Train's checkpoint upload fills the disk. One attempt, the one-line
    error naming the checkpoint folder, and no partial checkpoint folder left for a resume."""
    fill(disk, leave=256 * 1024)
    run = subprocess.run([sys.executable, str(REPO / "jobs" / "train.py"), *TINY[1:], f"--data.dataset={p60}",
                          f"--train.output={disk}", "--train.name=ray", "--train.epochs=2",
                          "--scaling.num_workers=1", "--model.head=classification"],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert run.returncode == 2, run.stderr[-2000:]
    ours = [line for line in run.stderr.splitlines() if line.startswith("error: ")]  # Ray's logs may follow it
    assert len(ours) == 1 and f"{disk / 'ray' / 'checkpoint_epoch_0000'}: disk full" in ours[0], ours
    assert (run.stdout + run.stderr).count("epoch   0 |") == 1  # trained once: not retried
    assert not [p.name for p in (disk / "ray").iterdir() if p.name.startswith("checkpoint_epoch")]


@pytest.mark.ray
@pytest.mark.slow
def test_case13_prepare_that_fills_the_disk_is_one_line(disk, aptos_dir):
    """The disk fills while Ray Data's tasks write the Parquet: the error line names the output,
    Ray Data's logged copies of the traceback are not shown, nothing is left on the disk."""
    fill(disk, leave=300 * 1024)  # the probe passes; 100 images at 128 px do not fit
    run = subprocess.run([sys.executable, str(REPO / "jobs" / "prepare.py"), f"--prepare.input={aptos_dir}",
                          f"--prepare.output={disk / 'prepared'}", "--prepare.limit=100", "--prepare.image_size=128"],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert run.returncode == 2, run.stderr[-2000:]
    lines = run.stderr.strip().splitlines()
    assert lines[-1] == f"error: {disk / 'prepared'}: disk full (Error writing bytes to file. Detail: [errno 28] " \
                        "No space left on device)", lines[-1]
    assert "Traceback" not in run.stderr, run.stderr[-2000:]
    assert sorted(p.name for p in disk.iterdir()) == [".filler"]


# ---------------------------------------------------------------- 16: read-only


@pytest.mark.parametrize("job", ["predict", "export", "train"])
def test_case16_read_only_output_is_one_line_before_ray(job, disk, p60, one_epoch, aptos_dir, no_ray, capsys):
    out = read_only(disk)
    line = one_line_exit_2(job, job_args(job, out, p60, one_epoch, aptos_dir), capsys)
    assert str(out) in line and "read-only file system" in line


# ---------------------------------------------------------------- 17: S3 endpoint down


def closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the block ends: nothing answers there


def test_case17_unreachable_s3_output_is_one_line(p60, no_ray, capsys):
    uri = f"s3://bucket/runs?endpoint_override=http://127.0.0.1:{closed_port()}&scheme=http"
    line = one_line_exit_2("train", [*TINY[1:], f"--data.dataset={p60}", f"--train.output={uri}"], capsys)
    assert "storage endpoint unreachable" in line and "s3://bucket/runs" in line


def test_case17_unreachable_s3_input_is_one_line(tmp_path, no_ray, capsys):
    uri = f"s3://bucket/raw?endpoint_override=http://127.0.0.1:{closed_port()}&scheme=http"
    line = one_line_exit_2("prepare", [f"--prepare.input={uri}", f"--prepare.output={tmp_path / 'p'}"], capsys)
    assert "storage endpoint unreachable" in line and "s3://bucket/raw" in line


# ---------------------------------------------------------------- 18, 19: ids and files


def csv_layout(aptos_dir: Path, root: Path, rows: list[str], files: dict[str, str]) -> Path:
    """``root/train.csv`` (``rows`` after the header) and ``root/train_images/`` with ``files``
    ({name: shared image id}); five more labelled images so that the CSV is usable."""
    images = root / "train_images"
    images.mkdir(parents=True)
    import pandas as pd

    labels = pd.read_csv(aptos_dir / "labels.csv").groupby("diagnosis").head(1)
    for row in labels.itertuples():
        shutil.copy(aptos_dir / "images" / f"{row.id_code}.png", images / f"{row.id_code}.png")
        rows = [*rows, f"{row.id_code},{row.diagnosis}"]
    for name, shared in files.items():
        shutil.copy(aptos_dir / "images" / f"{shared}.png", images / name)
    (root / "train.csv").write_text("id_code,diagnosis\n" + "\n".join(rows) + "\n")
    return root


def test_case18_one_file_under_two_ids_is_one_row(aptos_dir, tmp_path):
    shared = open(aptos_dir / "labels.csv").read().splitlines()[-1].split(",")[0]
    root = csv_layout(aptos_dir, tmp_path / "raw", ["a8,1", "a8.png,3"], {"a8.png": shared})
    src = read_source(PrepareConfig(input=str(root)))
    assert [r["id"] for r in src.records].count("a8") == 1 and "a8.png" not in {r["id"] for r in src.records}
    reasons = {q["id"]: q["reason"] for q in src.quarantined}
    assert reasons["a8.png"] == "duplicate file: same file as id 'a8' on line 2"


def test_case19_extension_in_another_case_is_named(aptos_dir, tmp_path):
    shared = open(aptos_dir / "labels.csv").read().splitlines()[-1].split(",")[0]
    root = csv_layout(aptos_dir, tmp_path / "raw", ["x.png,1", "y,2"], {"x.PNG": shared, "Y.Png": shared})
    reasons = {q["id"]: q["reason"] for q in read_source(PrepareConfig(input=str(root))).quarantined}
    assert reasons["x.png"] == "missing file: x.PNG exists (the name differs only in case)"
    assert reasons["y"] == "missing file: Y.Png exists (the name differs only in case)"


# ---------------------------------------------------------------- 20: processes and ports

DRIVER = """
import time
from aptos_ray.config import ScalingConfig
from aptos_ray.ray_setup import init_ray
init_ray(ScalingConfig())
import ray
ray.get(ray.remote(lambda: 1).remote())  # a worker process too
print("ready", flush=True)
time.sleep(600)
"""


def _process_table() -> dict[int, int]:
    table = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                table[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
        except OSError:
            pass
    return table


def _descendants(root: int) -> set[int]:
    table, found, todo = _process_table(), set(), [root]
    while todo:
        parent = todo.pop()
        kids = [pid for pid, ppid in table.items() if ppid == parent]
        found.update(kids)
        todo += kids
    return found


def _listening(pids: set[int]) -> list[str]:
    """'ip:port' of every listening TCP socket the processes hold (from /proc/net/tcp{,6})."""
    sockets = {}
    for name in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{name}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A":  # LISTEN
                address, port = fields[1].split(":")
                raw = bytes.fromhex(address)
                # /proc prints each 32-bit word in host (little-endian) order
                ip = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                sockets[fields[9]] = (ip, int(port, 16))
    found = []
    for pid in pids:
        try:
            links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        except OSError:
            continue
        for link in links:
            inode = link[8:-1] if link.startswith("socket:[") else None
            if inode in sockets:
                ip, port = sockets[inode]
                found.append(("127.0.0.1" if ip in (bytes([127, 0, 0, 1]), bytes(10) + b"\xff\xff\x7f\0\0\1")
                              else ip.hex()) + f":{port}")
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.ray
def test_case20_local_ray_dies_with_its_driver_and_listens_on_loopback_only(tmp_path):
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    driver = subprocess.Popen([sys.executable, "-c", DRIVER], stdout=subprocess.PIPE, text=True, env=env)
    ray_pids: set[int] = set()
    try:
        assert driver.stdout.readline().strip() == "ready"
        time.sleep(2)  # the agents have opened their ports
        ray_pids = _descendants(driver.pid)
        ports = _listening(ray_pids)
        assert ports and all(p.startswith("127.0.0.1:") for p in ports), ports
        driver.send_signal(signal.SIGKILL)
        driver.wait()
        deadline = time.monotonic() + 10
        while any(map(_alive, ray_pids)) and time.monotonic() < deadline:
            time.sleep(0.5)
        left = [pid for pid in ray_pids if _alive(pid)]
        assert not left, [Path(f"/proc/{p}/cmdline").read_text().replace("\0", " ")[:60] for p in left]
    finally:
        driver.kill()
        for pid in ray_pids:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


# ---------------------------------------------------------------- 21, 22: neighbours


def test_case21_a_file_rewritten_on_a_full_disk_stays_whole(disk):
    target = disk / "predict.json"
    storage.write_text(str(target), "old\n")
    fill(disk)
    with pytest.raises(StorageError, match="disk full"):
        storage.write_bytes(str(target), b"x" * 100_000)
    assert target.read_text() == "old\n" and sorted(p.name for p in disk.iterdir()) == [".filler", "predict.json"]


def test_case22_output_that_is_a_file_is_one_line(tmp_path, p60, no_ray, capsys):
    taken = tmp_path / "taken"
    taken.write_text("not a folder")
    line = one_line_exit_2("predict", [f"--predict.checkpoint={tmp_path}", f"--predict.images={p60}",
                                       f"--predict.output={taken}"], capsys)
    assert str(taken) in line
