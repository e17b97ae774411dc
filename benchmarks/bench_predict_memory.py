"""Predict's driver memory as its inputs grow: where it goes, stage by stage, to a local folder and to a URI.

    python benchmarks/bench_predict_memory.py --copies 1 7 30 --outputs local s3

Inputs: the shared APTOS PNGs under ``k`` new ids each (hard links in --work, so no image is
copied; 30 copies = 87,870 inputs, EyePACS' size), read as raw inputs with labels. Each predict is
its own child process with a local Ray of 2 CPUs and an untrained ``test_efficientnet`` (64 px;
the model's cost does not matter here). A URI output goes to a local S3 API (moto's server, in a
process of its own, so that its memory is not the driver's), where the Ray workers write
predictions.parquet as parts. The driver's resident memory (VmRSS) is read before and after each
stage of ``infer.predict`` and its peak (VmHWM) at the end. Not a test: prints tables.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
APTOS = ROOT.parent / "shared" / "data" / "aptos2019-224"
STAGES = ("find_inputs", "build_dataset", "collect", "split_results", "write_outputs", "screening_outputs",
          "write_report")
MiB = 2**20


def copies_folder(work: Path, k: int) -> Path:
    """``<work>/aptos-x<k>``: every shared photograph under k ids (``<id>_<j>``), hard-linked."""
    folder = work / f"aptos-x{k}"
    if (folder / "labels.csv").is_file():
        return folder
    labels = pd.read_csv(APTOS / "labels.csv")
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for j in range(k):
        for id_, grade in zip(labels.id_code, labels.diagnosis):
            target = folder / "images" / f"{id_}_{j}.png"
            if not target.exists():
                os.link(APTOS / "images" / f"{id_}.png", target)
            rows.append((f"{id_}_{j}", grade))
    pd.DataFrame(rows, columns=["id_code", "diagnosis"]).to_csv(folder / "labels.csv", index=False)
    return folder


def memory() -> tuple[float, float]:
    """(resident, peak resident) MiB of this process."""
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(status["VmRSS"].split()[0]) / 1024, int(status["VmHWM"].split()[0]) / 1024


class S3Server:
    """moto's S3 server in its own process, and the environment that points pyarrow (and Ray's
    workers, which inherit it) at it."""

    def __init__(self):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
                    "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1",
                    "AWS_EC2_METADATA_DISABLED": "true"}
        code = ("import logging, time; from moto.server import ThreadedMotoServer; "
                "logging.getLogger('werkzeug').setLevel(logging.ERROR); "
                f"ThreadedMotoServer(ip_address='127.0.0.1', port={port}, verbose=False).start(); time.sleep(1e9)")
        self.process = subprocess.Popen([sys.executable, "-c", code])
        import pyarrow.fs as pafs

        os.environ.update(self.env)
        self.fs = pafs.S3FileSystem(endpoint_override=self.env["AWS_ENDPOINT_URL"], allow_bucket_creation=True,
                                    access_key="testing", secret_key="testing", region="us-east-1")
        for _ in range(100):  # its start takes a few seconds
            try:
                self.fs.create_dir("memory")
                return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError("moto's S3 server did not start")

    def stop(self) -> None:
        self.process.kill()


def run_child(args) -> None:
    """One predict in this (child) process; its stage-by-stage memory as JSON to --result."""
    import ray

    from aptos_ray.config import Config
    from aptos_ray.infer import predict as predict_module
    from aptos_ray.ray_setup import local_ray_options, private_default_token

    stages = []

    def probe(name, function):
        @functools.wraps(function)
        def probed(*a, **k):
            before = memory()[0]
            result = function(*a, **k)
            stages.append({"stage": name, "before": before, "after": memory()[0], "peak": memory()[1]})
            return result
        return probed

    for name in STAGES:
        setattr(predict_module, name, probe(name, getattr(predict_module, name)))
    server = S3Server() if args.output == "s3" else None
    private_default_token()
    ray.init(num_cpus=2, object_store_memory=2 * 2**30, log_to_driver=False, **local_ray_options())
    cfg = Config()
    cfg.predict.checkpoint, cfg.predict.images, cfg.predict.num_actors = args.checkpoint, args.images, 1
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        cfg.predict.output = "s3://memory/out" if server else str(Path(tmp) / "out")
        started, (ray_up, _) = time.perf_counter(), memory()
        summary = predict_module.predict(cfg.validate())
        seconds = time.perf_counter() - started
    if server:
        server.stop()
    Path(args.result).write_text(json.dumps({"inputs": summary["num_inputs"], "seconds": seconds, "ray_up": ray_up,
                                             "peak": memory()[1], "stages": stages}))


def measure(checkpoint: Path, images: Path, output: str, result: Path, code: Path = ROOT) -> dict | None:
    cmd = [sys.executable, __file__, "--child", "--checkpoint", str(checkpoint), "--images", str(images),
           "--output", output, "--result", str(result), "--code", str(code)]
    print(f"predict {images.name} -> {output} ...", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": str(code), "RAY_ADDRESS": ""},
                          capture_output=True, text=True)
    if proc.returncode or not result.is_file():
        print(f"  failed ({proc.returncode}):\n{proc.stderr[-3000:]}", file=sys.stderr)
        return None
    return json.loads(result.read_text())


def tables(runs: dict) -> str:
    lines = ["| output | inputs | seconds | driver RSS with Ray up MiB | peak RSS MiB | peak above Ray up MiB |",
             "|---|---:|---:|---:|---:|---:|"]
    for (output, _), r in runs.items():
        lines.append(f"| {output} | {r['inputs']} | {r['seconds']:.0f} | {r['ray_up']:.0f} | {r['peak']:.0f} | "
                     f"{r['peak'] - r['ray_up']:.0f} |")
    lines += ["", "Growth per input between sizes (peak, and each stage's own growth: resident after - before):", "",
              "| output | inputs | peak KB/input | " + " | ".join(STAGES) + " |",
              "|---|---|---:|" + "---:|" * len(STAGES)]
    for output in dict.fromkeys(o for o, _ in runs):
        sizes = sorted((r["inputs"], r) for (o, _), r in runs.items() if o == output)
        for (n0, a), (n1, b) in zip(sizes, sizes[1:]):
            def grown(run: dict, stage: str) -> float:
                return sum(s["after"] - s["before"] for s in run["stages"] if s["stage"] == stage)
            per = [1024 * (grown(b, s) - grown(a, s)) / (n1 - n0) for s in STAGES]
            lines.append(f"| {output} | {n0} -> {n1} | {1024 * (b['peak'] - a['peak']) / (n1 - n0):.2f} | "
                         + " | ".join(f"{p:.2f}" for p in per) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copies", type=int, nargs="+", default=[1, 7], help="ids per shared photograph")
    parser.add_argument("--outputs", nargs="+", default=["local", "s3"], choices=["local", "s3"])
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "aptos-predict-memory")
    parser.add_argument("--code", type=Path, default=ROOT, help="the code root whose predict is measured")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--images", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(args.code if args.child else ROOT))
    if args.child:
        return run_child(args)
    from bench_predict import untrained_checkpoint

    args.work.mkdir(parents=True, exist_ok=True)
    checkpoint = untrained_checkpoint("test_efficientnet", 64, 256, args.work)
    started, runs = time.perf_counter(), {}
    for output in args.outputs:
        for k in args.copies:
            run = measure(checkpoint, copies_folder(args.work, k), output, args.work / f"result-{output}-{k}.json",
                          args.code)
            if run:
                runs[output, k] = run
    print(f"{time.perf_counter() - started:.0f} s", file=sys.stderr)
    print("\n## Results\n")
    print(tables(runs))


if __name__ == "__main__":
    main()
