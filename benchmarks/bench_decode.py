"""Full-size photographs decoded at the size needed (``preprocess.decode_photo``): cost and equality.

    python benchmarks/bench_decode.py                                # per-image cost + equality
    python benchmarks/bench_decode.py --jobs 200 --old /tmp/old-root  # + prepare and predict end to end, old vs new
    python benchmarks/bench_decode.py --parts stages --old /tmp/old-root  # predict's per-image work, stage by stage

Inputs, made once outside the repository (``--work``, default /tmp/aptos-fullsize): JPEGs at
EyePACS size (3888 x 2592, quality 90): the shared APTOS photographs enlarged (the disc 85-100% of
the height, centred in the 3:2 frame) and a few of the synthetic generator's photographs rendered
at full size (``synthetic.render_fundus``: vessels, lesions and noise drawn at that resolution).

1. Cost per image, decode + preprocess, in turns image by image: the full decode, the reduced
   decode (JPEG DCT-domain downscale, ``needed`` = the output size), and a plain PIL loop (open,
   convert, resize; no crop), at 128, 256 and 512 px output; the same on the 224 px APTOS PNGs
   (which are never reduced); and predict's row work (decode + quality check + preprocess).
2. Equality, reduced vs full decode: the preprocessed images (mean absolute difference per
   channel, PSNR), the fundus crop box (in photograph pixels), and the gradability verdicts on
   full-size copies of ``bench_gradability.py``'s degraded photographs (same seeded sample).
3. ``--jobs N``: prepare (256 px) and predict (test_efficientnet) end to end on N full-size JPEGs,
   each in its own process with a local Ray of 2 CPUs: wall seconds, driver peak RSS, peak disk;
   ``--old ROOT`` runs ROOT's code (e.g. ``git archive`` of the commit before) in the same run;
   each code trains its own checkpoint on its own prepare, and predicts with it.
   CPU seconds: the job's process tree sampled every half second, exited Ray workers included.
4. ``--parts stages``: predict's per-image work in one process, no Ray, old and new code: the Ray
   task's (``load_rows``: read, decode, quality check, preprocess) and the actor's (the model).

Not a test: prints Markdown tables after a '## Results' line (benchmarks/run.py keeps those).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
APTOS = ROOT.parent / "shared" / "data" / "aptos2019-224"
FULL = (3888, 2592)  # EyePACS' most common size (width, height)
SIZES = (128, 256, 512)
EYEPACS = 88_702


# ----------------------------------------------------------------------------- inputs


def framed(rgb: np.ndarray, diameter: int, size: tuple[int, int] = FULL) -> np.ndarray:
    """``rgb`` (a square fundus photograph) enlarged to ``diameter`` and centred in a black frame."""
    import cv2

    w, h = size
    disc = cv2.resize(rgb, (diameter, diameter), interpolation=cv2.INTER_CUBIC)
    out = np.zeros((h, w, 3), np.uint8)
    top, left = (h - diameter) // 2, (w - diameter) // 2
    src_top = max(0, -top)
    out[max(0, top):max(0, top) + diameter - 2 * src_top, left:left + diameter] = disc[src_top:diameter - src_top]
    return out


def jpeg_bytes(rgb: np.ndarray, quality: int = 90) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _make_aptos(job: tuple) -> None:
    from PIL import Image

    src, dst, fraction = job
    with Image.open(src) as im:
        rgb = np.asarray(im.convert("RGB"))
    Path(dst).write_bytes(jpeg_bytes(framed(rgb, int(FULL[1] * fraction))))


def _make_synthetic(job: tuple) -> None:
    sys.path.insert(0, str(ROOT))
    from aptos_ray.data.synthetic import render_fundus

    i, dst = job
    rgb = render_fundus(i % 5, np.random.default_rng([7, i]), FULL[1])
    Path(dst).write_bytes(jpeg_bytes(framed(rgb, FULL[1])))


def make_inputs(work: Path, n: int, synthetic: int) -> tuple[list[Path], list[Path]]:
    """``<work>/raw/{labels.csv, images/}`` (n enlarged APTOS photographs) and ``<work>/synthetic/``."""
    import pandas as pd

    labels = pd.read_csv(APTOS / "labels.csv")
    rng = np.random.default_rng(0)
    rows = [(f"f{i:05d}", labels.id_code[i], int(labels.diagnosis[i]), float(rng.uniform(0.85, 1.0))) for i in range(n)]
    images, syn = work / "raw" / "images", work / "synthetic"
    images.mkdir(parents=True, exist_ok=True)
    syn.mkdir(parents=True, exist_ok=True)
    jobs = [(APTOS / "images" / f"{src}.png", images / f"{id_}.jpg", frac) for id_, src, _, frac in rows
            if not (images / f"{id_}.jpg").exists()]
    syn_jobs = [(i, syn / f"syn{i:03d}.jpg") for i in range(synthetic) if not (syn / f"syn{i:03d}.jpg").exists()]
    if jobs or syn_jobs:
        started = time.perf_counter()
        with Pool(2) as pool:
            pool.map(_make_aptos, jobs, chunksize=16)
            pool.map(_make_synthetic, syn_jobs, chunksize=1)
        print(f"made {len(jobs) + len(syn_jobs)} inputs in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    pd.DataFrame({"id_code": [r[0] for r in rows], "diagnosis": [r[2] for r in rows]}).to_csv(
        work / "raw" / "labels.csv", index=False)
    return [images / f"{r[0]}.jpg" for r in rows], sorted(syn.glob("syn*.jpg"))[:synthetic]


# ----------------------------------------------------------------------------- 1. cost per image


def cost_table(full: list[bytes], pngs: list[bytes], small: list[bytes]) -> str:
    import cv2
    from PIL import Image

    from aptos_ray.config import PrepareConfig
    from aptos_ray.data.preprocess import decode_photo, preprocess
    from aptos_ray.infer.quality import assess_photo, decode_size

    cv2.setNumThreads(1)  # one image per core, as in a Ray task

    def plain(data: bytes, size: int):
        with Image.open(io.BytesIO(data)) as im:
            return im.convert("RGB").resize((size, size), Image.BILINEAR)

    def ours(data: bytes, cfg, reduced: bool):
        return preprocess(decode_photo(data, needed=cfg.image_size if reduced else 0).pixels, cfg)

    def predict_row(data: bytes, cfg, reduced: bool):
        photo = decode_photo(data, needed=decode_size(cfg) if reduced else 0)
        assess_photo(photo)
        return preprocess(photo.pixels, cfg)

    cases = [(f"full-size JPEG {FULL[0]}x{FULL[1]}", full, s, ours) for s in SIZES]
    cases += [("224 px PNG (APTOS)", pngs, 256, ours), ("512 px JPEG (bench_scale.py's inputs)", small, 256, ours),
              ("predict row: + quality check, full-size JPEG", full, 256, predict_row)]
    lines = ["| input | output px | images | full decode ms/img | reduced decode ms/img | plain PIL loop ms/img | "
             "full img/s | reduced img/s | plain PIL img/s | reduced / full speed-up |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, inputs, size, fn in cases:
        cfg = PrepareConfig(image_size=size)
        t = {"full": 0.0, "reduced": 0.0, "plain": 0.0}
        for data in inputs:  # in turns, image by image: load on the shared machine hits all three alike
            for method in t:
                started = time.perf_counter()
                if method == "plain":
                    plain(data, size)
                else:
                    fn(data, cfg, method == "reduced")
                t[method] += time.perf_counter() - started
        ms = {k: 1000 * v / len(inputs) for k, v in t.items()}
        plain_ms = f"{ms['plain']:.1f}" if fn is ours else "-"
        plain_rate = f"{1000 / ms['plain']:.1f}" if fn is ours else "-"
        lines.append(f"| {name} | {size} | {len(inputs)} | {ms['full']:.1f} | {ms['reduced']:.1f} | {plain_ms} | "
                     f"{1000 / ms['full']:.1f} | {1000 / ms['reduced']:.1f} | {plain_rate} | {ms['full'] / ms['reduced']:.1f}x |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- 2. equality


def compare(data: bytes, size: int) -> dict:
    """Reduced vs full decode of one JPEG, preprocessed at ``size``: differences and crop boxes."""
    from aptos_ray.config import PrepareConfig
    from aptos_ray.data.preprocess import decode_photo, fundus_box, preprocess

    cfg = PrepareConfig(image_size=size)
    full, reduced = decode_photo(data), decode_photo(data, needed=size)
    a, b = preprocess(full.pixels, cfg).astype(np.float64), preprocess(reduced.pixels, cfg).astype(np.float64)
    diff = np.abs(a - b)
    mse = float((diff ** 2).mean())
    box_full = np.array(fundus_box(full.pixels), float)
    box_reduced = np.array(fundus_box(reduced.pixels), float) * reduced.scale  # in photograph pixels
    side = max(box_full[1] - box_full[0], box_full[3] - box_full[2])
    return {"mad": diff.mean(axis=(0, 1)), "psnr": 10 * np.log10(255 ** 2 / mse) if mse else float("inf"),
            "box_px": float(np.abs(box_full - box_reduced).max()), "box_out_px": float(np.abs(box_full - box_reduced).max() / side * size),
            "factor": reduced.scale}


def equality_table(sets: dict[str, list[bytes]]) -> str:
    lines = ["| inputs | output px | images | reduction | mean abs diff per channel R / G / B (worst image) | "
             "PSNR dB, mean (worst) | crop box: largest difference, photograph px (output px) |",
             "|---|---:|---:|---:|---|---|---|"]
    for name, inputs in sets.items():
        for size in SIZES:
            rows = [compare(d, size) for d in inputs]
            mad = np.array([r["mad"] for r in rows])
            worst = mad[np.argmax(mad.max(axis=1))]
            psnr = [r["psnr"] for r in rows]
            box = max(rows, key=lambda r: r["box_px"])
            lines.append(f"| {name} | {size} | {len(rows)} | 1/{rows[0]['factor']:.0f} | "
                         f"{' / '.join(f'{v:.2f}' for v in mad.mean(axis=0))} ({' / '.join(f'{v:.2f}' for v in worst)}) | "
                         f"{np.mean(psnr):.1f} ({min(psnr):.1f}) | {box['box_px']:.0f} ({box['box_out_px']:.2f}) |")
    return "\n".join(lines)


def degrade_at(rgb: np.ndarray, kind: str, k: float) -> np.ndarray:
    """``degradations.degrade`` for a photograph ``k`` times the 224 px it was tuned at: blur scaled by k."""
    import cv2

    from benchmarks.degradations import degrade

    if kind.startswith("blur"):
        return cv2.GaussianBlur(rgb, (0, 0), {"blur": 3.0, "blur_mild": 1.5}[kind] * k)
    return degrade(rgb, kind)


def verdict_rows(name: str, photos: list[bytes], k: float) -> list[str]:
    """Per degradation: full vs reduced decode (as predict decodes) of full-size JPEG copies."""
    from aptos_ray.config import PrepareConfig
    from aptos_ray.data.preprocess import decode_photo
    from aptos_ray.infer.quality import assess, assess_photo, decode_size
    from benchmarks.degradations import DEGRADATIONS

    needed = decode_size(PrepareConfig())
    originals = [decode_photo(d).pixels for d in photos]
    lines = []
    for kind in ["original", *DEGRADATIONS]:
        agree, gradable, ratios = 0, [0, 0], []
        for rgb in originals:
            data = jpeg_bytes(rgb if kind == "original" else degrade_at(rgb, kind, k))
            full, reduced = decode_photo(data), decode_photo(data, needed=needed)
            qf, qr = assess(full.pixels), assess_photo(reduced)
            agree += qf.reason == qr.reason
            gradable[0] += qf.gradable
            gradable[1] += qr.gradable
            if np.isfinite(qf.sharpness) and np.isfinite(qr.sharpness) and qf.sharpness > 0:
                ratios.append(qr.sharpness / qf.sharpness)
        spread = f"{np.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})" if ratios else "-"
        expected = DEGRADATIONS.get(kind, "")
        lines.append(f"| {name} | {kind} | {'-' if expected is None else expected or 'gradable'} | {len(originals)} | "
                     f"{agree}/{len(originals)} | {gradable[0]} / {gradable[1]} | {spread} |")
    return lines


def verdict_table(n: int, synthetic: list[bytes], seed: int = 0) -> str:
    """Gradability verdicts, full vs reduced decode, on full-size JPEG copies of the degraded
    photographs of bench_gradability.py (same seeded sample of the shared folder, enlarged to the
    full height first) and of the synthetic photographs rendered at full size."""
    import cv2
    from PIL import Image

    paths = sorted((APTOS / "images").glob("*.png"))
    rng = np.random.default_rng(seed)
    k = FULL[1] / 224
    sample = [jpeg_bytes(cv2.resize(np.asarray(Image.open(p).convert("RGB")), (FULL[1], FULL[1]),
                                    interpolation=cv2.INTER_CUBIC))
              for p in rng.choice(paths, min(n, len(paths)), replace=False)]
    lines = ["| photographs | copies | expected | images | verdicts agree | gradable full / reduced | "
             "sharpness reduced / full, median (range) |", "|---|---|---|---:|---:|---:|---|"]
    lines += verdict_rows("APTOS enlarged", sample, k)
    if synthetic:
        lines += verdict_rows("synthetic, full size", synthetic, k)
    return "\n".join(lines)


# ----------------------------------------------------------------------------- 3. prepare and predict end to end


def peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def tree_cpu(root: int) -> dict[int, float]:
    """CPU seconds (user + system, its own, not its reaped children's) of a process and of each of
    its living descendants (Ray's workers), from /proc: unlike wall time, it hardly moves with other
    people's load on a shared machine."""
    stats = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:  # gone meanwhile
                continue
            stats[int(proc.name)] = (int(fields[1]), int(fields[11]) + int(fields[12]))  # ppid, utime + stime
    tree, todo = set(), [root]
    while todo:
        pid = todo.pop()
        tree.add(pid)
        todo += [p for p, (ppid, _) in stats.items() if ppid == pid and p not in tree]
    return {p: stats[p][1] / os.sysconf("SC_CLK_TCK") for p in tree if p in stats}


class CpuWatch:
    """The CPU seconds of a process tree, sampled every half second: a Ray worker that exits before
    the end still counts (all but its last half second), which one reading at the end would miss.
    Only a process's own time is summed (cutime would count a reaped worker twice)."""

    def __init__(self, root: int):
        self.root, self.seen = root, {}
        self.start = self.sample()

    def sample(self) -> dict[int, float]:
        now = tree_cpu(self.root)
        for pid, cpu in now.items():
            self.seen[pid] = max(self.seen.get(pid, 0.0), cpu)
        return now

    def seconds(self) -> float:
        """CPU seconds spent by the tree since this watch was made."""
        self.sample()
        return sum(cpu - self.start.get(pid, 0.0) for pid, cpu in self.seen.items())


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) if folder.exists() else 0


def run_stage(args) -> None:
    """One stage in this (child) process, with the code on PYTHONPATH; writes its figures to --result."""
    import threading

    import ray

    from aptos_ray.config import Config
    from aptos_ray.ray_setup import local_ray_options, private_default_token

    work = Path(args.work)
    private_default_token()
    ray.init(num_cpus=2, object_store_memory=2 * 2**30, log_to_driver=False, **local_ray_options())
    cfg = Config()
    folder = work / f"out-{args.stage}-{args.tag}"
    shutil.rmtree(folder, ignore_errors=True)
    disk, stop = [0], threading.Event()

    def watch():
        while not stop.wait(0.5):
            disk[0] = max(disk[0], folder_bytes(folder))
            cpu.sample()

    cpu = CpuWatch(os.getpid())  # Ray started, nothing run
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    started = time.perf_counter()
    extra = {}
    if args.stage in ("prepare", "prepare_png"):
        from aptos_ray.data.prepare import prepare

        cfg.prepare.input = str(work / args.input) if args.stage == "prepare" else str(APTOS)
        cfg.prepare.output, cfg.prepare.card = str(folder / "dataset"), False
        prepare(cfg)
        extra["content_hash"] = json.loads((folder / "dataset" / "manifest.json").read_text())["content_hash"]
    elif args.stage == "train":
        from aptos_ray.train.driver import train

        cfg.data.dataset = str(work / args.input / "dataset")
        cfg.model.name, cfg.model.pretrained, cfg.data.image_size = "test_efficientnet", "none", 64
        cfg.train.epochs, cfg.train.batch_size, cfg.train.tracking, cfg.train.local = 1, 32, "none", True
        cfg.train.output, cfg.train.name = str(folder), "run"
        train(cfg.validate())
    else:
        from aptos_ray.infer.predict import predict

        cfg.predict.checkpoint = str(work / f"out-train-{args.tag.split('-')[0]}" / "run")  # its own code's
        cfg.predict.images, cfg.predict.num_actors = str(work / args.input), 1
        cfg.predict.output = str(folder / "predict")
        predict(cfg.validate())
    seconds = time.perf_counter() - started
    stop.set()
    watcher.join()
    Path(args.result).write_text(json.dumps({"stage": args.stage, "tag": args.tag, "seconds": seconds,
                                             "cpu_seconds": cpu.seconds(), "driver_peak_rss": peak_rss(), "disk_peak": max(disk[0], folder_bytes(folder)),
                                             **extra}))
    ray.shutdown()


ROWS_BATCH = 32  # rows per call in the per-stage profile


def run_rows(args) -> None:
    """Predict's per-image work, stage by stage, in this (child) process with the code on PYTHONPATH:
    the Ray task's (``predict.load_rows``: read, decode, quality check, preprocess) and the actor's
    (``GradePredictor``: decode the stored rows, the model), called directly, no Ray; wall and CPU
    seconds (of every thread of the process) per image. Writes its figures to --result."""
    from dataclasses import asdict

    import torch

    from aptos_ray.config import PrepareConfig
    from aptos_ray.infer import predict as predict_module
    from aptos_ray.infer.ensemble import build_grader
    from aptos_ray.infer.inputs import find_inputs

    torch.set_num_threads(1)  # as in a predict actor given under one CPU: Ray sets OMP_NUM_THREADS=1
    items = find_inputs(str(Path(args.work) / args.input)).items
    batches = [{k: np.array([r[k] for r in items[i:i + ROWS_BATCH]]) for k in items[0]}
               for i in range(0, len(items), ROWS_BATCH)]
    # The actor as Ray builds it, without Ray (its constructor asks Ray for the GPUs it was given).
    actor = predict_module.GradePredictor.__new__(predict_module.GradePredictor)
    actor.grader = build_grader(str(Path(args.work) / f"out-train-{args.tag}" / "run"), "cpu", 0)
    actor.encoding, actor.float_columns = "raw", actor.grader.output_columns
    prepare = asdict(PrepareConfig())  # 256 px, as the checkpoint's dataset was prepared
    times = {"rows": [0.0, 0.0], "model": [0.0, 0.0]}
    for batch in batches:
        for stage, call in (("rows", lambda b: predict_module.load_rows(b, prepare)), ("model", actor)):
            wall, cpu = time.perf_counter(), time.process_time()
            batch = call(batch)
            times[stage][0] += time.perf_counter() - wall
            times[stage][1] += time.process_time() - cpu
        assert not any(batch["reason"]), batch["reason"]
    Path(args.result).write_text(json.dumps({"images": len(items), **{
        f"{stage}_{kind}": value for stage, (wall, cpu) in times.items() for kind, value in (("wall", wall), ("cpu", cpu))}}))


def stages_table(work: Path, n: int, old: Path | None, timeout: float) -> str:
    """Where predict's per-image time goes, old and new code: the row work of the Ray tasks (decode,
    quality check, preprocess) and the model's, each called in one process on n full-size JPEGs."""
    raw = subset(work, n)
    runs = {tag: run_child("rows", tag, code, work, timeout, raw) for tag, code in {"new": ROOT, **({"old": old} if old else {})}.items()}
    lines = ["| predict stage (256 px, one process, 1 torch thread) | images | wall old / new ms/img | CPU old / new ms/img | CPU speed-up |",
             "|---|---:|---:|---:|---:|"]
    for stage, name in (("rows", "Ray task: read, decode, quality check, preprocess (`load_rows`)"),
                        ("model", "actor: decode stored rows + model (`GradePredictor`, tta 0)")):
        o, w = runs.get("old"), runs["new"]
        if not w:
            continue
        def per(r: dict, k: str, stage: str = stage) -> float:
            return 1000 * r[f"{stage}_{k}"] / r["images"]

        old_wall, old_cpu = (f"{per(o, 'wall'):.0f}", f"{per(o, 'cpu'):.0f}") if o else ("-", "-")
        speed = f"{per(o, 'cpu') / per(w, 'cpu'):.1f}x" if o else "-"
        lines.append(f"| {name} | {w['images']} | {old_wall} / {per(w, 'wall'):.0f} | {old_cpu} / {per(w, 'cpu'):.0f} | {speed} |")
    return "\n".join(lines)


def run_child(stage: str, tag: str, code: Path, work: Path, timeout: float, input: str = "raw") -> dict | None:
    result = work / f"result-{stage}-{tag}.json"
    result.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--stage", stage, "--tag", tag, "--work", str(work),
           "--result", str(result), "--input", input]
    env = {**os.environ, "PYTHONPATH": str(code), "RAY_ADDRESS": ""}
    print(f"{stage} ({tag}) ...", file=sys.stderr, flush=True)
    try:
        proc = subprocess.run(cmd, env=env, timeout=timeout, capture_output=True, text=True, cwd=work)
    except subprocess.TimeoutExpired:
        print(f"  timed out after {timeout:.0f} s", file=sys.stderr)
        return None
    if proc.returncode or not result.is_file():
        print(f"  failed ({proc.returncode}):\n{proc.stderr[-3000:]}", file=sys.stderr)
        return None
    return json.loads(result.read_text())


def subset(work: Path, n: int) -> str:
    """``<work>/raw-<n>``: the first n inputs (hard links), for the fixed cost of a job."""
    import pandas as pd

    folder = work / f"raw-{n}"
    (folder / "images").mkdir(parents=True, exist_ok=True)
    labels = pd.read_csv(work / "raw" / "labels.csv").head(n)
    for id_ in labels.id_code:
        if not (folder / "images" / f"{id_}.jpg").exists():
            os.link(work / "raw" / "images" / f"{id_}.jpg", folder / "images" / f"{id_}.jpg")
    labels.to_csv(folder / "labels.csv", index=False)
    return folder.name


def jobs_table(work: Path, n: int, small: int, old: Path | None, timeout: float) -> str:
    """prepare and predict, old and new code, on n and on ``small`` inputs: the per-image cost is the
    difference over the n - small more images (fixed costs, Ray's and the model's start-up, cancel)."""
    codes = {"new": ROOT, **({"old": old} if old else {})}
    runs: dict[tuple, dict | None] = {}
    sizes = [n] + ([small] if small else [])
    for size in sizes:
        raw = subset(work, size)
        for tag, code in codes.items():
            runs["prepare", tag, size] = run_child("prepare", f"{tag}-{size}", code, work, timeout, raw)
        for tag, code in codes.items():  # one checkpoint per code: an older version may not read a newer one's config
            if size == n and not (work / f"out-train-{tag}" / "run").is_dir():
                run_child("train", tag, code, work, timeout, f"out-prepare-{tag}-{n}")
        for tag, code in codes.items():
            runs["predict", tag, size] = run_child("predict", f"{tag}-{size}", code, work, timeout, raw)
    lines = ["| job (full-size JPEGs, 256 px) | images | wall old / new s | wall speed-up | CPU old / new s | "
             "CPU speed-up | driver peak RSS old / new MiB | disk peak old / new MiB |",
             "|---|---:|---:|---:|---:|---:|---|---|"]
    for stage in ("prepare", "predict"):
        for size in sizes:
            o, w = runs.get((stage, "old", size)), runs.get((stage, "new", size))
            if not w:
                continue
            old_s = f"{o['seconds']:.1f}" if o else "-"
            speed = f"{o['seconds'] / w['seconds']:.1f}x" if o else "-"
            old_cpu = f"{o['cpu_seconds']:.1f}" if o else "-"
            cpu_speed = f"{o['cpu_seconds'] / w['cpu_seconds']:.1f}x" if o else "-"
            old_rss = f"{o['driver_peak_rss'] / 2**20:.0f}" if o else "-"
            old_disk = f"{o['disk_peak'] / 2**20:.0f}" if o else "-"
            lines.append(f"| {stage} | {size} | {old_s} / {w['seconds']:.1f} | {speed} | {old_cpu} / {w['cpu_seconds']:.1f} | {cpu_speed} | "
                         f"{old_rss} / {w['driver_peak_rss'] / 2**20:.0f} | {old_disk} / {w['disk_peak'] / 2**20:.0f} |")
    if small:
        lines += ["", f"Per image, the difference between {n} and {small} images (fixed costs cancel):", "",
                  "| job | wall old / new ms/img | wall speed-up | CPU old / new ms/img | CPU speed-up |",
                  "|---|---:|---:|---:|---:|"]
        for stage in ("prepare", "predict"):
            per = {}
            for tag in codes:
                big, little = runs.get((stage, tag, n)), runs.get((stage, tag, small))
                if big and little:
                    per[tag] = [1000 * (big[k] - little[k]) / (n - small) for k in ("seconds", "cpu_seconds")]
            if "new" in per and "old" in per:
                (ow, oc), (nw, nc) = per["old"], per["new"]
                lines.append(f"| {stage} | {ow:.0f} / {nw:.0f} | {ow / nw:.1f}x | {oc:.0f} / {nc:.0f} | {oc / nc:.1f}x |")
    (work / "jobs.json").write_text(json.dumps({"-".join(map(str, k)): r for k, r in runs.items()}))
    return "\n".join(lines)


def png_table(work: Path, old: Path, timeout: float) -> str:
    """Prepare of the shared APTOS PNGs (default settings), old and new code: the content hashes."""
    new_run, old_run = (run_child("prepare_png", tag, code, work, timeout) for tag, code in (("new", ROOT), ("old", old)))
    if not new_run or not old_run:
        return "(prepare of the shared folder failed: see stderr)"
    same = "same" if new_run["content_hash"] == old_run["content_hash"] else "DIFFERENT"
    return "\n".join(["| shared APTOS folder (PNG), default settings | content hash old | content hash new | |",
                      "|---|---|---|---|",
                      f"| prepare | {old_run['content_hash'][:16]} | {new_run['content_hash'][:16]} | {same} |"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/aptos-fullsize"))
    parser.add_argument("--images", type=int, default=30, help="full-size JPEGs timed and compared")
    parser.add_argument("--synthetic", type=int, default=4, help="synthetic photographs at full size (~6 s each to render)")
    parser.add_argument("--degrade", type=int, default=30, help="photographs degraded for the verdict comparison")
    parser.add_argument("--jobs", type=int, default=0, help="full-size JPEGs for prepare and predict end to end (0: skip)")
    parser.add_argument("--jobs-small", type=int, default=20, help="the same jobs on this many, for their fixed cost")
    parser.add_argument("--stages", type=int, default=64, help="full-size JPEGs for predict's per-stage profile")
    parser.add_argument("--input", default="raw", help=argparse.SUPPRESS)
    parser.add_argument("--old", type=Path, default=None, help="a code root whose prepare and predict run beside")
    parser.add_argument("--timeout", type=float, default=1200, help="seconds per job")
    parser.add_argument("--parts", nargs="+", default=["cost", "equality", "jobs"], choices=["cost", "equality", "jobs", "stages", "png"])
    parser.add_argument("--stage", choices=("prepare", "train", "predict", "prepare_png", "rows"))
    parser.add_argument("--tag")
    parser.add_argument("--result")
    args = parser.parse_args()
    if args.stage == "rows":
        return run_rows(args)
    if args.stage:
        return run_stage(args)
    sys.path.insert(0, str(ROOT))
    import cv2
    from PIL import Image

    args.work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    # labels.csv lists the n made here: every part's inputs are its first rows
    aptos, synthetic = make_inputs(args.work, max(args.images, args.jobs, args.stages if "stages" in args.parts else 0),
                                   args.synthetic)
    full = [p.read_bytes() for p in aptos[:args.images]]
    pngs = [p.read_bytes() for p in sorted((APTOS / "images").glob("*.png"))[:args.images]]
    small = [jpeg_bytes(cv2.resize(np.asarray(Image.open(io.BytesIO(d)).convert("RGB")), (512, 512),
                                   interpolation=cv2.INTER_LINEAR)) for d in pngs]
    syn = [p.read_bytes() for p in synthetic]
    cost = cost_table(full, pngs, small) if "cost" in args.parts else ""
    equal = equality_table({"APTOS enlarged": full, "synthetic, rendered at full size": syn}) if "equality" in args.parts else ""
    verdicts = verdict_table(args.degrade, syn) if "equality" in args.parts else ""
    jobs = jobs_table(args.work, args.jobs, args.jobs_small, args.old, args.timeout) if args.jobs and "jobs" in args.parts else ""
    stages = stages_table(args.work, args.stages, args.old, args.timeout) if "stages" in args.parts else ""
    png = png_table(args.work, args.old, args.timeout) if args.old and "png" in args.parts else ""
    print(f"{time.perf_counter() - started:.0f} s", file=sys.stderr)

    print("\n## Results\n")
    if cost:
        print(f"Decode + preprocess per image, one core, in turns ({os.cpu_count()} cores, shared):\n")
        print(cost)
    if equal:
        print("\nReduced vs full decode, the preprocessed images and the fundus crop box:\n")
        print(equal)
        print(f"\nGradability verdicts, full vs reduced decode, on full-size copies ({FULL[1]} px high) of "
              f"bench_gradability.py's degraded photographs:\n")
        print(verdicts)
    if jobs:
        print("\nEnd to end, each job its own process with a local Ray of 2 CPUs:\n")
        print(jobs)
    if stages:
        print("\nPredict's per-image work, stage by stage, called in one process (no Ray):\n")
        print(stages)
    if png:
        print("\nThe shared APTOS PNGs prepare to the same dataset:\n")
        print(png)


if __name__ == "__main__":
    main()
