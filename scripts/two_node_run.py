#!/usr/bin/env python
"""A real two-node Ray cluster on one machine: the training job submitted to it like to any cluster.

    .venv/bin/python scripts/two_node_run.py [--per-grade 60] [--keep]

1. starts a Ray head and a second Ray node (`ray start --block`, 1 CPU each, free ports, a
   private --temp-dir, the dashboard and job server on 127.0.0.1, token authentication on with a
   token file of its own), so it never touches another Ray instance on this machine;
2. writes a small prepared dataset (a subset of ../shared/data/aptos2019-224 when it is there,
   else synthetic fundus photos prepared by a `jobs/prepare.py` job on this cluster);
3. submits `python jobs/train.py` with `ray job submit --working-dir .` twice, with 2 and with 1
   training worker(s) x 1 CPU: 2 workers cannot fit on one node, so they run on both nodes;
   data and runs are addressed as file:// URIs, standing in for s3:// shared storage;
4. checks from Ray's State API that the RayTrainWorker actors of the 2-worker job ran on two
   different nodes, and prints training images/s with 1 vs 2 workers (metrics.jsonl);
5. stops exactly the two nodes it started: SIGTERM to their `ray start --block` processes, which
   shut down their own raylet, GCS and workers (`ray stop` would kill every Ray on the machine),
   then SIGKILL for any process still naming this run's temp dir.

Exit status 0 when both jobs succeeded and the 2 workers ran on 2 nodes. See docs/CLUSTER.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the environment's `ray` and `python`
SHARED_APTOS = Path(os.environ.get("APTOS_RAY_SHARED_DATA", REPO.parent / "shared" / "data")) / "aptos2019-224"
TINY = ["--model.name=test_efficientnet", "--model.pretrained=none", "--model.head=classification",
        "--data.image_size=32", "--train.epochs=1", "--train.batch_size=8",
        "--train.eval_batch_size=32", "--train.progress=false", "--optim.warmup_epochs=0"]
MEGABYTE = 1024 * 1024
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def free_ports(n: int) -> list[int]:
    """n distinct ports that are free on 127.0.0.1 right now."""
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def log(msg: str) -> None:
    print(f"[two-node {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class TwoNodeCluster:
    """A head and one more node on this machine, owned by this process and stopped by it."""

    def __init__(self, root: Path, head_cpus: int = 1, worker_cpus: int = 1, head_resources: str = "",
                 worker_prefix: tuple[str, ...] = (), env: dict[str, str] | None = None):
        """head_resources: custom resources of the head (`ray start --resources` JSON); worker_prefix:
        what the second node's `ray start` runs inside (scripts/masked_node_run.py: a mount
        namespace); env: extra variables for both nodes, the job client and this process."""
        self.root = root
        self.temp_dir = root / "ray"  # short: Ray's socket paths live below it
        gcs, dashboard, client, agent_head, agent_worker = free_ports(5)
        self.gcs_address = f"127.0.0.1:{gcs}"
        self.dashboard = f"http://127.0.0.1:{dashboard}"
        token = root / "auth_token"
        # What `ray get-auth-token --generate` writes; created 0600, never readable by others even briefly.
        fd = os.open(token, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
        token.chmod(0o600)  # O_CREAT's mode applies only to a new file
        self.env = {
            # RAY_AUTH_TOKEN would take precedence over this run's token file
            **{k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")},
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # `python` in jobs = this venv
            # Token authentication, with this run's own token (not ~/.ray/auth_token): every node,
            # the job client and the State API read both variables.
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(token),
            "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",  # nothing to drain: stop at once
            "RAY_USAGE_STATS_ENABLED": "0",
            **(env or {}),
        }
        self.extra_env = dict(env or {})
        common = ["--block", "--disable-usage-stats", f"--object-store-memory={300 * MEGABYTE}"]
        self.head_cmd = [str(BIN / "ray"), "start", "--head", f"--port={gcs}", f"--temp-dir={self.temp_dir}",
                         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
                         f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent_head}",
                         f"--num-cpus={head_cpus}", *([f"--resources={head_resources}"] if head_resources else []),
                         *common]
        # Its own temp dir, as on another machine (a shared one would make both nodes' log
        # monitors stream every worker's output twice).
        self.worker_cmd = [*worker_prefix, str(BIN / "ray"), "start", f"--address={self.gcs_address}",
                           f"--temp-dir={root / 'ray-node2'}",
                           f"--dashboard-agent-listen-port={agent_worker}", f"--num-cpus={worker_cpus}", *common]
        self.procs: list[subprocess.Popen] = []

    def _start(self, cmd: list[str], name: str) -> None:
        log(" ".join(cmd[cmd.index("start"):]))
        out = open(self.root / f"{name}.log", "w")
        # Own session: a Ctrl-C in the terminal reaches only this script, which stops the nodes.
        self.procs.append(subprocess.Popen(cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                           start_new_session=True))

    def start(self, timeout: float = 120) -> list[dict]:
        # This process talks to the cluster too (State API, job info): the same token settings.
        os.environ.update({k: self.env[k] for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", *self.extra_env)})
        os.environ.pop("RAY_AUTH_TOKEN", None)
        self._start(self.head_cmd, "head")
        self._wait_nodes(1, timeout)
        self._start(self.worker_cmd, "worker")
        return self._wait_nodes(2, timeout)

    def _wait_nodes(self, n: int, timeout: float) -> list[dict]:
        from ray.util.state import list_nodes

        deadline = time.time() + timeout
        while time.time() < deadline:
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"`ray start` exited with {p.returncode}: see {self.root}/*.log")
            try:
                alive = [node for node in list_nodes(address=self.dashboard, raise_on_missing_output=False)
                         if node.state == "ALIVE"]
                if len(alive) >= n:
                    return [{"node_id": x.node_id, "is_head": x.is_head_node} for x in alive]
            except Exception:  # dashboard not up yet
                pass
            time.sleep(1)
        raise TimeoutError(f"{n} Ray node(s) not alive after {timeout:.0f}s: see {self.root}/*.log")

    def submit(self, name: str, entrypoint: list[str], options: tuple[str, ...] = ()) -> tuple[bool, float, str]:
        """`ray job submit --working-dir <repo> [options] -- <entrypoint>`; (succeeded, seconds, log)."""
        cmd = [str(BIN / "ray"), "job", "submit", f"--address={self.dashboard}", f"--submission-id={name}",
               f"--working-dir={REPO}", *options, "--", *entrypoint]
        log(f"ray job submit --working-dir . --submission-id {name} {' '.join(options)} -- {' '.join(entrypoint)}")
        started = time.perf_counter()
        out = subprocess.run(cmd, env=self.env, cwd=REPO, capture_output=True, text=True)
        seconds = time.perf_counter() - started
        (self.root / f"{name}.log").write_text(out.stdout + out.stderr)
        return out.returncode == 0, seconds, out.stdout + out.stderr

    def train_worker_nodes(self, submission_id: str) -> list[str]:
        """Node ids of the RayTrainWorker actors of one submitted job (State API, token auth)."""
        from ray.job_submission import JobSubmissionClient
        from ray.util.state import list_actors

        job_id = JobSubmissionClient(self.dashboard).get_job_info(submission_id).job_id
        actors = list_actors(address=self.dashboard, detail=True, limit=1000, raise_on_missing_output=False,
                             filters=[("class_name", "=", "RayTrainWorker"), ("job_id", "=", job_id)])
        return sorted(a.node_id for a in actors)

    def stop(self) -> None:
        """SIGTERM to our `ray start --block` processes (each stops its node), then mop up by temp dir."""
        for p in reversed(self.procs):  # worker node first, the head last
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    p.kill()
        leftovers = self._own_processes()
        for pid in leftovers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        log(f"stopped the 2 nodes (pids {[p.pid for p in self.procs]}); "
            f"{len(leftovers)} leftover process(es) of this run killed")

    def _own_processes(self) -> list[int]:
        """Processes whose command line names this run's temp dirs: ours and no one else's."""
        mine = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                if str(self.root).encode() in (entry / "cmdline").read_bytes():
                    mine.append(int(entry.name))
            except OSError:
                pass
        return mine


def make_dataset(cluster: TwoNodeCluster, per_grade: int) -> Path:
    """A small prepared dataset: real APTOS images when available, else synthetic ones."""
    out = cluster.root / "data" / "prepared"
    if (SHARED_APTOS / "labels.csv").is_file():
        sys.path.insert(0, str(REPO / "tests"))
        from helpers import aptos_subset

        log(f"dataset: {per_grade} images per grade from {SHARED_APTOS}, 32 px")
        return aptos_subset(SHARED_APTOS, out, per_grade=per_grade, size=32)
    from aptos_ray.config import SyntheticConfig
    from aptos_ray.data.synthetic import generate

    raw = generate(SyntheticConfig(output=str(cluster.root / "data" / "raw"), num_images=5 * per_grade,
                                   image_size=64))
    log(f"dataset: {5 * per_grade} synthetic images, prepared by a job on the cluster")
    ok, _, tail = cluster.submit("aptos-2n-prepare", [
        "python", "jobs/prepare.py", f"--prepare.input={raw}", f"--prepare.output={out}",
        "--prepare.image_size=32", "--prepare.card=false", "--prepare.test_fraction=0"])
    if not ok:
        raise RuntimeError("prepare job failed:\n" + tail[-3000:])
    return out


def images_per_s(run_dir: Path) -> float:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return json.loads(lines[-1])["images_per_s"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--per-grade", type=int, default=60, help="images per grade in the dataset")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs, runs) afterwards")
    args = parser.parse_args(argv)

    root = Path(tempfile.mkdtemp(prefix="aptos2n-", dir="/tmp"))
    cluster = TwoNodeCluster(root)
    started = time.perf_counter()
    ok = False
    try:
        nodes = cluster.start()
        log(f"cluster up in {time.perf_counter() - started:.0f}s: {len(nodes)} nodes "
            + ", ".join(f"{n['node_id'][:8]}{' (head)' if n['is_head'] else ''}" for n in nodes)
            + f"; dashboard/job server {cluster.dashboard} (token auth)")
        dataset = make_dataset(cluster, args.per_grade)
        results = {}
        for workers in (2, 1):
            name = f"aptos-2n-w{workers}"
            succeeded, seconds, output = cluster.submit(name, [
                "python", "jobs/train.py", *TINY, f"--data.dataset=file://{dataset}",
                f"--train.output=file://{root}/runs", f"--train.name=w{workers}",
                f"--scaling.num_workers={workers}", "--scaling.cpus_per_worker=1"])
            if not succeeded:
                log(f"job {name} FAILED after {seconds:.0f}s; last lines:\n" + output[-4000:])
                return 1
            nodes_used = cluster.train_worker_nodes(name)
            results[workers] = {"seconds": seconds, "images_per_s": images_per_s(root / "runs" / f"w{workers}"),
                                "nodes": nodes_used}
            epoch = next((ANSI.sub("", line).split(") ")[-1] for line in output.splitlines() if " QWK " in line), "")
            log(f"job {name} SUCCEEDED in {seconds:.0f}s; workers on nodes "
                f"{[n[:8] for n in nodes_used]}\n    {epoch.strip()}")
        spread = len(set(results[2]["nodes"])) == 2 and len(results[2]["nodes"]) == 2
        one, two = results[1]["images_per_s"], results[2]["images_per_s"]
        print("\nTwo-node run")
        print(f"  2 training workers on {len(set(results[2]['nodes']))} different nodes: "
              f"{'yes' if spread else 'NO'} ({', '.join(n[:8] for n in results[2]['nodes'])})")
        print(f"  training images/s, 1 worker : {one:8.1f}   (job {results[1]['seconds']:.0f}s)")
        print(f"  training images/s, 2 workers: {two:8.1f}   (job {results[2]['seconds']:.0f}s)"
              f"   speed-up x{two / one:.2f}")
        ok = spread
    finally:
        cluster.stop()
        finish(root, args.keep, started, "logs and runs " + (f"kept in {root}" if args.keep else "removed"))
    return 0 if ok else 1


def finish(root: Path, keep: bool, started: float, what: str) -> None:
    """The last line of a run (its total time and ``what``); the run's folder removed unless ``keep``."""
    print(f"  total {time.perf_counter() - started:.0f}s; {what}")
    if not keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
