"""The cost curve of prepare, one training epoch and predict as the dataset grows (issue 20).

    python benchmarks/bench_scale.py --sizes 1000 5000               # new code; results kept in --work
    python benchmarks/bench_scale.py --sizes 1000 5000 --old ../main  # + the old prepare, side by side
    python benchmarks/bench_scale.py --sizes 20000 --timeout 2400     # adds a size to the same results
    python benchmarks/bench_scale.py --render                         # table, slopes, extrapolation only

Inputs: 512 px JPEGs made outside the repository (``--work``, default /tmp/aptos-scale): jittered
upscales of the shared APTOS photographs (one of the 8 flips/rotations, brightness x0.9-1.1), so
each size is a labels.csv + images/ folder like the Kaggle layout; smaller sizes hard-link the
first images of the largest. Every stage runs in its own driver process (a fresh Ray, started by
it with ``--store-gib`` of object store, so the materialise-or-stream decision is the one a small
machine makes) and reports: wall seconds, the driver's peak RSS (VmHWM), the object store's peak
use and spilled bytes (polled once a second from the raylet), and the peak bytes on disk under the
stage's output folder. Stages: prepare (default settings, 256 px, with the data card), one epoch
of test_efficientnet at 64 px with 1 Ray Train worker, predict of the train split (1 actor).
``--old ROOT`` runs ROOT's prepare (e.g. the main checkout) on the same inputs for the side by side.
Not a test: prints Markdown and keeps every measurement in ``<work>/results.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
APTOS = ROOT.parent / "shared" / "data" / "aptos2019-224"
EYEPACS = 88_702  # photographs in the 2015 EyePACS set
STAGES = ("prepare", "train", "predict")


# ----------------------------------------------------------------------------- inputs


def _make_image(job: tuple) -> None:
    from PIL import Image, ImageEnhance

    src, dst, variant, gain = job
    with Image.open(src) as im:
        im = im.convert("RGB")
    if variant % 4:
        im = im.rotate(90 * (variant % 4), expand=True)
    if variant >= 4:
        im = im.transpose(Image.FLIP_LEFT_RIGHT)
    im = ImageEnhance.Brightness(im).enhance(gain).resize((512, 512), Image.BILINEAR)
    im.save(dst, quality=90)


def make_inputs(work: Path, sizes: list[int]) -> dict[int, Path]:
    """``<work>/raw-N/{labels.csv, images/}`` for each size (JPEG, 512 px); made once."""
    import pandas as pd

    labels = pd.read_csv(APTOS / "labels.csv")
    largest = max(sizes)
    full = work / f"raw-{largest}"
    rng = np.random.default_rng(0)
    rows = [(f"s{i:06d}", labels.id_code[i % len(labels)], int(labels.diagnosis[i % len(labels)]),
             i // len(labels) % 8, float(rng.uniform(0.9, 1.1))) for i in range(largest)]
    if not (full / "labels.csv").is_file():
        (full / "images").mkdir(parents=True, exist_ok=True)
        jobs = [(APTOS / "images" / f"{src}.png", full / "images" / f"{id_}.jpg", variant, gain)
                for id_, src, _, variant, gain in rows if not (full / "images" / f"{id_}.jpg").exists()]
        started = time.perf_counter()
        with Pool(2) as pool:
            pool.map(_make_image, jobs, chunksize=64)
        print(f"made {len(jobs)} inputs in {time.perf_counter() - started:.0f} s", file=sys.stderr)
        pd.DataFrame({"id_code": [r[0] for r in rows], "diagnosis": [r[2] for r in rows]}).to_csv(
            full / "labels.csv", index=False)
    out = {}
    for n in sizes:
        folder = work / f"raw-{n}"
        if n != largest and not (folder / "labels.csv").is_file():
            (folder / "images").mkdir(parents=True, exist_ok=True)
            for id_, *_ in rows[:n]:
                target = folder / "images" / f"{id_}.jpg"
                if not target.exists():
                    os.link(full / "images" / f"{id_}.jpg", target)
            pd.DataFrame({"id_code": [r[0] for r in rows[:n]], "diagnosis": [r[2] for r in rows[:n]]}).to_csv(
                folder / "labels.csv", index=False)
        out[n] = folder
    return out


# ----------------------------------------------------------------------------- one stage (child process)


class Monitor:
    """Polls the object store (used, spilled) and the bytes under a folder; keeps the peaks."""

    def __init__(self, folder: Path):
        import ray

        self.folder, self.store, self.spilled, self.disk = folder, 0, 0, 0
        self.address = ray.get_runtime_context().gcs_address  # this Ray, not another one on the machine
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._poll()

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            self._poll()

    def _poll(self) -> None:
        from ray._private.internal_api import get_memory_info_reply, get_state_from_address

        try:
            stats = get_memory_info_reply(get_state_from_address(self.address)).store_stats
            self.store = max(self.store, stats.object_store_bytes_used)
            self.spilled = max(self.spilled, stats.spilled_bytes_total)
        except Exception:  # Ray going down at the end of a stage
            pass
        self.disk = max(self.disk, folder_bytes(self.folder))


def folder_bytes(folder: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.stat(os.path.join(dirpath, name)).st_size
            except FileNotFoundError:  # removed while we walked (staging)
                pass
    return total


def peak_rss(key: str = "VmHWM") -> int:
    """This process's peak (VmHWM) or current (VmRSS) resident memory, bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) * 1024
    return 0


def run_stage(args) -> None:
    import ray

    from aptos_ray.config import Config
    from aptos_ray.ray_setup import local_ray_options, private_default_token

    work, n = Path(args.work), args.n
    tag = "old" if args.old_code else "new"
    private_default_token()
    ray.init(num_cpus=2, object_store_memory=int(args.store_gib * 2**30), log_to_driver=False, **local_ray_options())
    cfg = Config()
    cfg.scaling.num_workers = 1
    folder = work / f"out-{args.stage}-{n}-{tag}"
    shutil.rmtree(folder, ignore_errors=True)  # a rerun measures a fresh run (train refuses an existing one)
    import importlib

    # the stage's own modules in the baseline, not the others' (predict and train import torch, prepare does not)
    importlib.import_module({"prepare": "aptos_ray.data.prepare", "train": "aptos_ray.train.driver",
                             "predict": "aptos_ray.infer.predict"}[args.stage])

    baseline = peak_rss("VmRSS")  # Ray connected, the job's modules imported, no image touched yet
    started = time.perf_counter()
    with Monitor(folder) as mon:
        if args.stage == "prepare":
            from aptos_ray.data.prepare import prepare

            cfg.prepare.input, cfg.prepare.output = str(work / f"raw-{n}"), str(folder / "dataset")
            prepare(cfg)
        elif args.stage == "train":
            from aptos_ray.train.driver import train

            cfg.data.dataset = str(work / f"out-prepare-{n}-new" / "dataset")
            cfg.model.name, cfg.model.pretrained, cfg.data.image_size = "test_efficientnet", "none", 64
            cfg.train.epochs, cfg.train.batch_size, cfg.train.tracking = 1, 64, "none"
            cfg.train.output, cfg.train.name = str(folder), "run"
            train(cfg.validate())
        else:
            from aptos_ray.infer.predict import predict

            cfg.predict.checkpoint = str(work / f"out-train-{n}-new" / "run")
            cfg.predict.images = str(work / f"out-prepare-{n}-new" / "dataset")
            cfg.predict.split, cfg.predict.num_actors, cfg.predict.output = "train", 1, str(folder / "predict")
            predict(cfg.validate())
    seconds = time.perf_counter() - started
    result = {"stage": args.stage, "code": tag, "n": n, "seconds": round(seconds, 1), "driver_peak_rss": peak_rss(), "driver_baseline_rss": baseline,
              "store_peak": mon.store, "spilled": mon.spilled, "disk_peak": mon.disk,
              "disk_final": folder_bytes(folder), "store_gib": args.store_gib}
    Path(args.result).write_text(json.dumps(result))
    ray.shutdown()


# ----------------------------------------------------------------------------- driver of the benchmark


def dedup_seconds(sizes: list[int]) -> dict[int, float]:
    """The driver's one serial, superlinear step: all-pairs pHash distances (256-bit hashes)."""
    sys.path.insert(0, str(ROOT))
    from aptos_ray.data.splits import near_duplicate_groups

    out = {}
    for n in sizes:
        hashes = np.random.default_rng(n).integers(0, 2**63, size=(n, 4), dtype=np.uint64)
        started = time.perf_counter()
        near_duplicate_groups(hashes, 4)
        out[n] = round(time.perf_counter() - started, 2)
    return out


def run_child(stage: str, n: int, work: Path, code: Path, store_gib: float, timeout: float) -> dict | None:
    result = work / f"result-{stage}-{n}-{'old' if code != ROOT else 'new'}.json"
    result.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--stage", stage, "--n", str(n), "--work", str(work),
           "--store-gib", str(store_gib), "--result", str(result)] + (["--old-code"] if code != ROOT else [])
    env = {**os.environ, "PYTHONPATH": str(code), "RAY_ADDRESS": ""}
    print(f"{stage} {n} ({'old' if code != ROOT else 'new'}) ...", file=sys.stderr, flush=True)
    try:
        proc = subprocess.run(cmd, env=env, timeout=timeout, capture_output=True, text=True, cwd=work)
    except subprocess.TimeoutExpired:
        print(f"  timed out after {timeout:.0f} s", file=sys.stderr)
        return None
    if proc.returncode or not result.is_file():
        print(f"  failed ({proc.returncode}):\n{proc.stderr[-3000:]}", file=sys.stderr)
        return None
    return json.loads(result.read_text())


def fit(ns: list[int], values: list[float]) -> tuple[float, float, float]:
    """(intercept, slope per 1k images, log-log exponent) of values over ns."""
    x = np.array(ns, float) / 1000
    y = np.array(values, float)
    slope, intercept = np.polyfit(x, y, 1) if len(x) > 1 else (y[0] / x[0], 0.0)
    exponent = np.polyfit(np.log(x), np.log(np.maximum(y, 1e-9)), 1)[0] if len(x) > 1 else float("nan")
    return float(intercept), float(slope), float(exponent)


def growth(r: dict) -> str:
    """The driver's peak above its resident memory when the stage started (Ray up, modules imported)."""
    base = r.get("driver_baseline_rss")
    return f"+{(r['driver_peak_rss'] - base) / 2**20:.0f}" if base else "n/a"


def gib(b: float) -> str:
    return f"{b / 2**30:.2f}"


def render(results: list[dict], dedup: dict) -> str:
    new = sorted((r for r in results if r["code"] == "new"), key=lambda r: (STAGES.index(r["stage"]), r["n"]))
    lines = ["| stage | images | wall s | s / 1k images | driver peak RSS MiB (above start) | object store peak GiB | "
             "spilled GiB | disk peak GiB | disk after GiB |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in new:
        lines.append(f"| {r['stage']} | {r['n']:,} | {r['seconds']:.0f} | {1000 * r['seconds'] / r['n']:.1f} | "
                     f"{r['driver_peak_rss'] / 2**20:.0f} ({growth(r)}) | {gib(r['store_peak'])} | {gib(r['spilled'])} | "
                     f"{gib(r['disk_peak'])} | {gib(r['disk_final'])} |")
    old = {r["n"]: r for r in results if r["code"] == "old" and r["stage"] == "prepare"}
    if old:
        lines += ["", "Prepare, old (one driver-side writer) vs new (workers write), same inputs and run:", "",
                  "| images | wall old / new | driver peak RSS old / new MiB | ratio | disk peak old / new GiB |",
                  "|---:|---:|---:|---:|---:|"]
        for n, o in sorted(old.items()):
            w = next((r for r in new if r["stage"] == "prepare" and r["n"] == n), None)
            if w:
                lines.append(f"| {n:,} | {o['seconds']:.0f} / {w['seconds']:.0f} s | {o['driver_peak_rss'] / 2**20:.0f} "
                             f"({growth(o)}) / {w['driver_peak_rss'] / 2**20:.0f} ({growth(w)}) | "
                             f"{o['driver_peak_rss'] / w['driver_peak_rss']:.2f}x | "
                             f"{gib(o['disk_peak'])} / {gib(w['disk_peak'])} |")
    dedup = {int(n): s for n, s in (dedup or {}).items()}
    at_eyepacs = dedup[max(dedup)] * (EYEPACS / max(dedup)) ** 2 if dedup else 0.0
    lines += ["", f"Growth (fits over the new rows; extrapolated to {EYEPACS:,} images):", "",
              "| stage | wall: s fixed + s per 1k | log-log exponent | driver RSS 1k -> largest | "
              f"wall at {EYEPACS:,}, here | 4 nodes | disk at {EYEPACS:,} GiB |", "|---|---|---:|---:|---:|---:|---:|"]
    for stage in STAGES:
        rows = [r for r in new if r["stage"] == stage]
        if len(rows) < 2:
            continue
        ns = [r["n"] for r in rows]
        a, b, k = fit(ns, [r["seconds"] for r in rows])
        _, disk_b, _ = fit(ns, [r["disk_peak"] for r in rows])
        rss = [r["driver_peak_rss"] for r in rows]
        serial = at_eyepacs if stage == "prepare" else 0.0  # the driver's near-duplicate search does not spread
        here = a + b * EYEPACS / 1000 + serial
        nodes = a + serial + b * EYEPACS / 1000 / 4
        lines.append(f"| {stage} | {a:.0f} + {b:.1f} | {k:.2f} | {rss[0] / 2**20:.0f} -> {rss[-1] / 2**20:.0f} MiB "
                     f"({rss[-1] / rss[0] - 1:+.0%}) | {here / 3600:.2f} h | {nodes / 3600:.2f} h | "
                     f"{gib(disk_b * EYEPACS / 1000)} |")
    if dedup:
        lines += ["", "Near-duplicate search on the driver (all pairs of 256-bit pHashes, random hashes): "
                  + ", ".join(f"{n:,}: {s:.1f} s" for n, s in sorted(dedup.items()))
                  + f"; quadratic, so ~{at_eyepacs:.0f} s at {EYEPACS:,} (added to prepare's extrapolation, "
                  "beyond its linear fit)."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000])
    parser.add_argument("--work", type=Path, default=Path("/tmp/aptos-scale"))
    parser.add_argument("--largest", type=int, default=20000, help="inputs are made for this many images once")
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    parser.add_argument("--old", type=Path, default=None, help="a checkout whose prepare runs beside (e.g. ../main)")
    parser.add_argument("--old-sizes", type=int, nargs="*", default=None, help="sizes for --old (default: --sizes)")
    parser.add_argument("--store-gib", type=float, default=3.0, help="object store of each stage's Ray")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per stage")
    parser.add_argument("--render", action="store_true", help="only print the table of the kept results")
    # one stage, in a child process
    parser.add_argument("--stage", choices=STAGES)
    parser.add_argument("--n", type=int)
    parser.add_argument("--result")
    parser.add_argument("--old-code", action="store_true")
    args = parser.parse_args()
    if args.stage:
        return run_stage(args)

    args.work.mkdir(parents=True, exist_ok=True)
    store = args.work / "results.json"
    kept = json.loads(store.read_text()) if store.is_file() else {"results": [], "dedup": {}}
    if not args.render:
        make_inputs(args.work, sorted(set(args.sizes) | {args.largest}))
        for n in args.sizes:
            runs = [(s, ROOT) for s in args.stages]
            if args.old and "prepare" in args.stages and n in (args.old_sizes if args.old_sizes is not None else args.sizes):
                runs.insert(0, ("prepare", args.old.resolve()))
            for stage, code in runs:
                result = run_child(stage, n, args.work, code, args.store_gib, args.timeout)
                if result:
                    kept["results"] = [r for r in kept["results"]
                                       if (r["stage"], r["n"], r["code"]) != (stage, n, result["code"])] + [result]
                    store.write_text(json.dumps(kept, indent=1))
                    print(f"  {json.dumps(result)}", file=sys.stderr)
                elif stage != "prepare" or code != ROOT:
                    continue
                else:
                    break  # train and predict need this size's dataset
        kept["dedup"] = {str(n): s for n, s in dedup_seconds([1000, 5000, 20000]).items()}
        store.write_text(json.dumps(kept, indent=1))
    print("## Results")
    print(render(kept["results"], kept["dedup"]))


if __name__ == "__main__":
    main()
