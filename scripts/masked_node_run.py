#!/usr/bin/env python
"""A two-node Ray cluster whose second node cannot see the driver's files: prepare, train and
predict must reach their data through shared storage (an S3 API on localhost), and fail with one
clear line when given driver-local paths.

    python scripts/masked_node_run.py [--per-grade 10] [--half both|local|uri] [--keep]

1. starts an S3 API on 127.0.0.1 (tests/s3.py: moto's ThreadedMotoServer, in this process) and a bucket; both
   Ray nodes get its endpoint and test credentials in their environment (AWS_ENDPOINT_URL, ...), as
   real nodes get theirs from an instance role;
2. starts a Ray head (2 CPUs and a `driver` resource) and a second node (3 CPUs) whose
   `ray start --block` runs in its own mount namespace (`unshare -m --propagation private`) with
   an empty tmpfs mounted over this run's data and runs folders, the checkout's data/ and runs/
   and the shared data folder: any task there that opens a driver-local path finds nothing. The
   code (the job's working_dir) and the Python environment stay visible;
3. writes a small raw dataset (labels.csv + images/, from ../shared/data/aptos2019-224) to local
   disk and to the bucket, plus a local prepared dataset and a `--local` checkpoint;
4. local half: prepare, train and predict with driver-local paths must fail, exit status 2, with
   an `error:` line that says to use a URI or shared storage (not quarantine images, not a
   traceback);
   URI half: prepare (s3 raw -> s3 dataset), train (2 workers x 2 CPUs: one per node; runs in the
   bucket) and predict (checkpoint and raw images from the bucket, output to the bucket) succeed,
   and so does predict from the bucket into a local output folder that node 2 cannot see (its
   prediction rows stream to the driver);
5. for every job, counts from Ray's State API where its tasks and actors ran: prepare and predict
   are submitted with `--entrypoint-num-cpus=2 --entrypoint-resources={"driver": 1}`, so the
   driver holds the head's CPUs and every task and actor runs on the masked node;
6. stops exactly the two nodes it started (never `ray stop`) and the S3 server.

Exit status 0 when every job ended as expected. Needs root (mount namespaces). See docs/CLUSTER.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from two_node_run import ANSI, REPO, SHARED_APTOS, TINY, TwoNodeCluster, finish, log  # noqa: E402

SHARED_DATA = SHARED_APTOS.parent
# Prepare and predict: the driver takes the head's 2 CPUs, so their tasks and actors go to node 2.
ON_MASKED_NODE = ("--entrypoint-num-cpus=2", '--entrypoint-resources={"driver": 1}')
CLEAR_ERROR = re.compile(r"^error: .*(URI|shared storage)", re.I | re.M)


def masked_dirs(root: Path) -> list[Path]:
    """What node 2 must not see: this run's local data and runs, the checkout's, the shared data."""
    dirs = [root / "data", root / "runs", REPO / "data", REPO / "runs"]
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)  # a mount point must exist; data/ and runs/ are gitignored
    return dirs + ([SHARED_DATA] if SHARED_DATA.is_dir() else [])


def namespace_prefix(dirs: list[Path]) -> tuple[str, ...]:
    """Run a command in a private mount namespace with an empty tmpfs over each of ``dirs``."""
    mounts = " && ".join(f"mount -t tmpfs -o size=64m,mode=0755 aptos-masked {shlex.quote(str(d))}" for d in dirs)
    return ("unshare", "-m", "--propagation", "private", "sh", "-c", f'{mounts} && exec "$@"', "masked-node")


def start_s3():
    """The tests' S3 server (tests/s3.py: moto on 127.0.0.1) with one bucket; the environment
    (AWS_ENDPOINT_URL, test credentials) set here and passed to both nodes."""
    sys.path.insert(0, str(REPO / "tests"))
    import s3

    s3.set_environment()
    server = s3.S3()
    return server, server.bucket(), dict(s3.ENV)


def write_raw(out: Path, per_grade: int) -> Path:
    """labels.csv + images/: a stratified subset of the shared APTOS folder (files copied as they are)."""
    import pandas as pd

    labels = pd.read_csv(SHARED_APTOS / "labels.csv")
    chosen = labels.groupby("diagnosis").sample(n=per_grade, random_state=0)
    (out / "images").mkdir(parents=True)
    for image_id in chosen["id_code"]:
        shutil.copy(SHARED_APTOS / "images" / f"{image_id}.png", out / "images" / f"{image_id}.png")
    chosen.to_csv(out / "labels.csv", index=False)
    return out


def check_masked(cluster: TwoNodeCluster, dirs: list[Path], marker: Path) -> bool:
    """Node 2's mount table has a tmpfs on every masked folder, and a file the driver sees is not there."""
    pid = cluster.procs[1].pid
    mounts = {line.split()[4] for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines()
              if " - tmpfs aptos-masked " in line}
    hidden = marker.exists() and not Path(f"/proc/{pid}/root{marker}").exists()
    ok = mounts >= {str(d) for d in dirs} and hidden
    log(f"node 2 (pid {pid}) has an empty tmpfs over {len(mounts)} folder(s): {sorted(mounts)}; "
        f"{marker.name} visible to the driver, not to node 2: {'yes' if hidden else 'NO'}")
    return ok


def where_it_ran(cluster: TwoNodeCluster, submission_id: str, masked_node: str) -> dict:
    """Tasks and actors of a job by node (State API): counts and the names that ran on node 2."""
    from ray.job_submission import JobSubmissionClient
    from ray.util.state import list_tasks

    info = JobSubmissionClient(cluster.dashboard).get_job_info(submission_id)
    time.sleep(2)  # task events reach the GCS a moment after the job ends
    tasks = [] if info.job_id is None else list_tasks(  # None: the driver never connected to Ray
        address=cluster.dashboard, filters=[("job_id", "=", info.job_id)], detail=True, limit=10000,
        raise_on_missing_output=False)
    on_masked = [t for t in tasks if t.node_id == masked_node]
    elsewhere = [t for t in tasks if t.node_id and t.node_id != masked_node]
    return {"masked": len(on_masked), "other": len(elsewhere),
            "names": dict(Counter(t.name for t in on_masked).most_common(4)),
            "other_names": dict(Counter(t.name for t in elsewhere).most_common(6)),
            "exit_code": getattr(info, "driver_exit_code", None),
            "message": (info.message or "").splitlines()[0] if info.message else ""}


def verdict(expect_ok: bool, succeeded: bool, output: str, where: dict) -> tuple[bool, str]:
    """(as expected?, why): a local-path job must fail with exit 2 and the one clear line."""
    lines = [ANSI.sub("", line) for line in output.splitlines()]
    error = next((line for line in reversed(lines) if line.startswith("error:")), "")
    if where["masked"] == 0:
        return False, "no task or actor ran on the masked node"
    if expect_ok:
        return succeeded, "succeeded" if succeeded else f"FAILED: {error or lines[-1] if lines else ''}"
    if succeeded:
        quarantine = next((line for line in lines if "quarantin" in line.lower()), "")
        return False, f"SUCCEEDED with local paths (silent): {quarantine}".strip()
    clear = bool(CLEAR_ERROR.search("\n".join(lines))) and where["exit_code"] in (2, None) \
        and not any(line.startswith("Traceback") for line in lines)
    return clear, (error or "no `error:` line") + ("" if clear else f"  [exit {where['exit_code']}; not the clear error]")


def run_job(cluster, name, args, expect_ok, masked_node, options=()) -> dict:
    succeeded, seconds, output = cluster.submit(name, ["python", *args], options)
    where = where_it_ran(cluster, name, masked_node)
    ok, why = verdict(expect_ok, succeeded, output, where)
    log(f"{name}: {'as expected' if ok else 'NOT as expected'} in {seconds:.0f}s; tasks/actors on the masked "
        f"node {where['masked']}, elsewhere {where['other']}\n    on node 2: {where['names']}\n"
        f"    elsewhere: {where['other_names']}\n    {why}")
    if not ok:
        log(f"{name}: last lines:\n" + "\n".join(output.splitlines()[-25:]))
    return {"job": name, "expected": "succeed" if expect_ok else "fail clearly", "ok": ok, "why": why,
            "seconds": round(seconds), **where}


def three_jobs(cluster: TwoNodeCluster, label: str, masked: str, expect_ok: bool, raw, prepared_out, dataset,
               runs, name: str, checkpoint, predict_out) -> list[dict]:
    """prepare, train (2 workers: one on each node) and predict, with their inputs and outputs at
    the given locations: local paths (expected to fail clearly) or bucket URIs (expected to work)."""
    return [
        run_job(cluster, f"masked-prepare-{label}", ["jobs/prepare.py", f"--prepare.input={raw}",
                f"--prepare.output={prepared_out}", "--prepare.image_size=32", "--prepare.card=false"],
                expect_ok, masked, ON_MASKED_NODE),
        run_job(cluster, f"masked-train-{label}", ["jobs/train.py", *TINY, f"--data.dataset={dataset}",
                f"--train.output={runs}", f"--train.name={name}", "--scaling.num_workers=2",
                "--scaling.cpus_per_worker=2"], expect_ok, masked),
        run_job(cluster, f"masked-predict-{label}", ["jobs/predict.py", f"--predict.checkpoint={checkpoint}",
                f"--predict.images={raw}", f"--predict.output={predict_out}", "--predict.batch_size=16"],
                expect_ok, masked, ON_MASKED_NODE),
    ]


def local_half(cluster: TwoNodeCluster, root: Path, raw: Path, masked: str) -> list[dict]:
    sys.path.insert(0, str(REPO / "tests"))
    from helpers import aptos_subset

    prepared = aptos_subset(SHARED_APTOS, root / "data" / "prepared", per_grade=10, size=32)
    # A checkpoint on the driver's disk, as after a --local run on a laptop.
    subprocess.run([sys.executable, "jobs/train.py", "--local", *TINY, f"--data.dataset={prepared}",
                    f"--train.output={root / 'runs'}", "--train.name=laptop"], cwd=REPO, check=True,
                   capture_output=True, env=cluster.env)
    return three_jobs(cluster, "local", masked, expect_ok=False, raw=raw,
                      prepared_out=root / "data" / "prepared-on-cluster", dataset=prepared,
                      runs=root / "runs", name="cluster", checkpoint=root / "runs" / "laptop",
                      predict_out=root / "outputs" / "predict")


def predict_to_local_output(cluster: TwoNodeCluster, bucket: str, raw: Path, masked: str, out: Path) -> dict:
    """Predict from the bucket (checkpoint and raw images) into a folder on the driver's disk that
    node 2 cannot see, while every actor runs on node 2: every input must reach the local outputs."""
    result = run_job(cluster, "masked-predict-s3-local", ["jobs/predict.py",
                     f"--predict.checkpoint={bucket}/runs/masked", f"--predict.images={bucket}/raw",
                     f"--predict.output={out}", "--predict.batch_size=16"], True, masked, ON_MASKED_NODE)
    if result["ok"]:
        summary = json.loads((out / "predict.json").read_text())
        complete = summary["num_inputs"] == summary["num_predicted"] + summary["num_unreadable"] > 0
        result.update(ok=complete, why=f"{result['why']}; {summary['num_predicted']} of {summary['num_inputs']} "
                                       f"inputs predicted into the driver's local {out.name}/")
    return result


def uri_half(cluster: TwoNodeCluster, s3, bucket: str, raw: Path, masked: str, root: Path) -> list[dict]:
    s3.upload(raw, f"{bucket}/raw")
    results = three_jobs(cluster, "s3", masked, expect_ok=True, raw=f"{bucket}/raw",
                         prepared_out=f"{bucket}/prepared", dataset=f"{bucket}/prepared", runs=f"{bucket}/runs",
                         name="masked", checkpoint=f"{bucket}/runs/masked", predict_out=f"{bucket}/predict")
    # runs/ is masked on node 2: a staging part written there would never reach the driver
    results.append(predict_to_local_output(cluster, bucket, raw, masked, root / "runs" / "predict-local"))
    train = next(r for r in results if r["job"] == "masked-train-s3")
    if train["ok"]:
        nodes = cluster.train_worker_nodes("masked-train-s3")
        spread = len(set(nodes)) == 2 and masked in nodes
        train.update(ok=spread, why=f"{train['why']}; 2 training workers on 2 nodes: {'yes' if spread else 'NO'}")
    written = [key for key in s3.keys(bucket) if not key.startswith("raw/")]
    log(f"{bucket} holds {len(written)} file(s) besides raw/: "
        + ", ".join(f"{top}/ {sum(k.startswith(top + '/') for k in written)}" for top in sorted({k.split('/')[0] for k in written})))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--per-grade", type=int, default=10, help="raw images per grade")
    parser.add_argument("--half", choices=["both", "local", "uri"], default="both",
                        help="local: local paths must fail clearly; uri: s3:// URIs must succeed")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs, runs) afterwards")
    args = parser.parse_args(argv)
    if os.geteuid() != 0 or not shutil.which("unshare"):
        print("masked_node_run.py needs root and unshare(1): it mounts tmpfs in a mount namespace", file=sys.stderr)
        return 2
    if not (SHARED_APTOS / "labels.csv").is_file():
        print(f"masked_node_run.py needs the APTOS images: {SHARED_APTOS}", file=sys.stderr)
        return 2

    root = Path(tempfile.mkdtemp(prefix="aptosmask-", dir="/tmp"))
    started = time.perf_counter()
    server, bucket, s3_env = start_s3()
    dirs = masked_dirs(root)
    raw = write_raw(root / "data" / "raw", args.per_grade)
    marker = root / "data" / "driver-only.txt"
    marker.write_text("only the driver's node sees this\n")
    cluster = TwoNodeCluster(root, head_cpus=2, worker_cpus=3, head_resources='{"driver": 1}',
                             worker_prefix=namespace_prefix(dirs), env=s3_env)
    results: list[dict] = []
    ok = False
    try:
        nodes = cluster.start()
        masked = next(n["node_id"] for n in nodes if not n["is_head"])
        log(f"cluster up in {time.perf_counter() - started:.0f}s; masked node {masked[:8]}; "
            f"S3 API {s3_env['AWS_ENDPOINT_URL']}, {bucket}; {len(list(raw.glob('images/*.png')))} raw images")
        if not check_masked(cluster, dirs, marker):
            return 1
        if args.half in ("both", "local"):
            results += local_half(cluster, root, raw, masked)
        if args.half in ("both", "uri"):
            results += uri_half(cluster, server, bucket, raw, masked, root)
        print("\nMasked-worker run: node 2 sees an empty tmpfs over " + ", ".join(str(d) for d in dirs))
        print(f"  {'job':<24} {'expected':<13} {'as expected':<12} {'on node 2':>9} {'elsewhere':>9} {'s':>4}  result")
        print("  (tasks and actor calls from the State API; elsewhere = the head, Ray's 0-CPU bookkeeping actors included)")
        for r in results:
            print(f"  {r['job']:<24} {r['expected']:<13} {'yes' if r['ok'] else 'NO':<12} {r['masked']:>9} "
                  f"{r['other']:>9} {r['seconds']:>4}  {r['why']}")
        (root / "results.json").write_text(json.dumps(results, indent=1))
        ok = all(r["ok"] for r in results)
    finally:
        cluster.stop()
        server.stop()
        finish(root, args.keep, started, f"{'all as expected' if ok else 'NOT all as expected'}; "
               + (f"logs kept in {root}" if args.keep else "logs removed"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
